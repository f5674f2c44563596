"""Tensor (vocabulary) parallel LM head: rank r holds rows [r V/t, (r+1) V/t) of the head
weight; the loss and gradients equal the single-process head's, and no rank holds the full
logits or the full weight.   torchrun --nproc-per-node 2 examples/loop_tensor_parallel.py"""
import torch
import torch.distributed as dist

import crossent.torch as xt
from crossent.torch.distributed import vocab_parallel_linear_cross_entropy

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
vocab, dim = 8192, 64
torch.manual_seed(0)  # same hidden states and labels on every rank of the group
hidden = torch.randn(256, dim, requires_grad=True)
labels = torch.randint(0, vocab, (256,))
full_weight = torch.randn(vocab, dim) * 0.05
local_weight = full_weight.chunk(world)[rank].clone().requires_grad_()  # (V/t, D)

loss = vocab_parallel_linear_cross_entropy(hidden, local_weight, labels, label_smoothing=0.1)
loss.backward()  # hidden.grad is all-reduced over the group; local_weight.grad is this slice

w = full_weight.clone().requires_grad_()                 # reference: one process, whole head
x = hidden.detach().clone().requires_grad_()
ref = xt.linear_cross_entropy(x, w, labels, label_smoothing=0.1)
ref.backward()
diff = max((hidden.grad - x.grad).abs().max().item(),
           (local_weight.grad - w.grad.chunk(world)[rank]).abs().max().item())
print(f"rank {rank}: loss {loss.item():.6f}, single process {ref.item():.6f}, "
      f"max |grad diff| {diff:.1e}")
dist.destroy_process_group()
