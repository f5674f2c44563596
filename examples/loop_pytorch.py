"""A plain PyTorch training loop whose loss never builds the (tokens, vocab) logits,
with gradient accumulation that equals the full batch.  python examples/loop_pytorch.py"""
import torch

import crossent.torch as xt
from crossent.torch.distributed import global_num_items

vocab, dim = 8192, 128
torch.manual_seed(0)
body = torch.nn.Sequential(torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, dim))
head = torch.nn.Linear(dim, vocab, bias=False)
opt = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=0.1)

tokens = torch.randint(0, vocab, (8, 65))
inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
prompt = torch.randint(5, 40, (8, 1))                    # e.g. prompt tokens: no loss,
labels[torch.arange(64) < prompt] = -100                # so micro-batches count unevenly

# one step on the whole batch
hidden = body(inputs)                                    # (B, T, D)
loss = xt.linear_cross_entropy(hidden.flatten(0, 1), head.weight, labels.flatten())
loss.backward()

# the same step as 4 micro-batches: sum each one's loss, divide by the whole step's count
full_grad = head.weight.grad.clone()
opt.zero_grad()
micro = list(zip(inputs.chunk(4), labels.chunk(4), strict=True))
num_items = global_num_items([y for _, y in micro])      # non-ignored labels of the step
for x, y in micro:
    h = body(x).flatten(0, 1)
    (xt.linear_cross_entropy(h, head.weight, y.flatten(), reduction="sum") / num_items).backward()
print(f"max |accumulated - full| grad: {(head.weight.grad - full_grad).abs().max().item():.1e}")
opt.step()
