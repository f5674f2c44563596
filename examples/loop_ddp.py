"""Data parallel + gradient accumulation: every rank's micro-batches, each loss summed and
divided by the whole step's token count, give exactly the single-process full-batch gradient.
    torchrun --nproc-per-node 2 examples/loop_ddp.py          (gloo on CPU, NCCL on CUDA)"""
import torch
import torch.distributed as dist

import crossent.torch as xt
from crossent.torch.distributed import global_num_items


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, dim))
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, x, y, num_items=None):  # the loss; the (tokens, vocab) logits never exist
        h = self.body(x).flatten(0, 1)
        if num_items is None:
            return xt.linear_cross_entropy(h, self.head.weight, y.flatten())
        loss_sum = xt.linear_cross_entropy(h, self.head.weight, y.flatten(), reduction="sum")
        return loss_sum / num_items


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # same model and data on every rank
model = TinyLM(vocab=4096, dim=64)
tokens = torch.randint(0, 4096, (8 * world, 33))
labels = tokens[:, 1:].clone()
labels[torch.rand(labels.shape) < 0.4] = -100             # uneven counts per micro-batch
reference = TinyLM(4096, 64)
reference.load_state_dict(model.state_dict())

ddp = torch.nn.parallel.DistributedDataParallel(model)
mine = list(zip(tokens[rank::world, :-1].chunk(4), labels[rank::world].chunk(4), strict=True))
num_items = global_num_items([y for _, y in mine])      # all ranks, all micro-batches
for i, (x, y) in enumerate(mine):
    with ddp.no_sync() if i < len(mine) - 1 else torch.enable_grad():  # sync on the last
        (ddp(x, y, num_items) * world).backward()       # DDP averages gradients over ranks

reference(tokens[:, :-1], labels).backward()            # one process, the whole batch
if rank == 0:
    worst = max((p.grad - q.grad).abs().max().item()
                for p, q in zip(model.parameters(), reference.parameters(), strict=True))
    print(f"max |DDP accumulated - full batch| grad: {worst:.1e}")
dist.destroy_process_group()
