"""Vocab-parallel cross-entropy: logits whose classes are split across processes.

Each of the ``world`` processes holds a contiguous slice of the class dimension of the
``(N, V)`` logits (what a tensor-parallel output layer produces) and calls
:func:`crossent.torch.distributed.vocab_parallel_cross_entropy`; the loss and each slice's
gradient equal single-process :func:`crossent.torch.cross_entropy` on the whole logits,
which this script also computes (on the logits gathered to rank 0) so the equality shows.

    torchrun --nproc-per-node 2 examples/vocab_parallel.py      # gloo on CPU, NCCL on CUDA
    python examples/vocab_parallel.py                            # one process, no launcher
    torchrun --nproc-per-node 2 examples/vocab_parallel.py --bench --rows 4096 --classes 32000

``--bench`` times forward + backward (median of ``--repeats`` runs, after one warm-up);
``--threads`` sets torch's intra-op threads per process. ``V`` need not divide evenly:
the first ``V % world`` ranks get one class more (explicit ``vocab_start``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

import crossent.torch as xt
from crossent.torch.distributed import vocab_parallel_cross_entropy


def split(num_classes: int, world: int) -> list[int]:
    base, extra = divmod(num_classes, world)
    return [base + (r < extra) for r in range(world)]


def gather_columns(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All ranks' column slices, concatenated (padded all_gather: slices may differ)."""
    if len(sizes) == 1:
        return local
    width = max(sizes)
    padded = torch.zeros(local.shape[0], width, dtype=local.dtype)
    padded[:, : local.shape[1]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:, :s] for p, s in zip(parts, sizes, strict=True)], dim=1)


class CountAllReduce:
    """Counts torch.distributed.all_reduce calls and the bytes they reduce."""

    def __init__(self):
        self.calls, self.bytes = 0, 0

    def __enter__(self):
        self._orig = dist.all_reduce

        def counted(tensor, *args, **kwargs):
            self.calls += 1
            self.bytes += tensor.numel() * tensor.element_size()
            return self._orig(tensor, *args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024, help="N, rows (tokens)")
    parser.add_argument("--classes", type=int, default=32000, help="V, classes (vocabulary)")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--z-loss", type=float, default=1e-4)
    parser.add_argument("--bench", action="store_true", help="time forward + backward")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}"
                          if launched and torch.cuda.is_available() else "cpu")

    n, v = args.rows, args.classes
    sizes = split(v, world)
    lo = sum(sizes[:rank])
    g = torch.Generator().manual_seed(0)  # the same target on every rank
    target = torch.randint(0, v, (n,), generator=g)
    target[::10] = -100
    # each rank draws only its own columns, from generators seeded per column block, so
    # the logits are the same whatever the number of processes
    block = 1000
    local = torch.empty(n, sizes[rank])
    for c0 in range(lo - lo % block, lo + sizes[rank], block):
        cols = torch.randn(n, block, generator=torch.Generator().manual_seed(1 + c0 // block))
        a, b = max(c0, lo), min(c0 + block, lo + sizes[rank])
        local[:, a - lo:b - lo] = 2.0 * cols[:, a - c0:b - c0]
    local = local.to(device)
    target = target.to(device)
    opts = dict(label_smoothing=args.label_smoothing, z_loss=args.z_loss)

    leaf = local.clone().requires_grad_()
    with CountAllReduce() as fwd:
        loss = vocab_parallel_cross_entropy(leaf, target, vocab_start=lo, **opts)
    with CountAllReduce() as bwd:
        loss.backward()

    whole = gather_columns(local.cpu(), sizes)
    grads = gather_columns(leaf.grad.cpu(), sizes)
    if rank == 0:
        ref_in = whole.clone().requires_grad_()
        ref = xt.cross_entropy(ref_in, target.cpu(), **opts)
        ref.backward()
        gdiff = (grads - ref_in.grad).abs().max().item()
        print(f"world={world} N={n} V={v} slices={sizes} eps={args.label_smoothing} "
              f"z_loss={args.z_loss}")
        print(f"vocab-parallel loss           {loss.item():.8f}")
        print(f"single-process loss (gathered) {ref.item():.8f}   |diff| "
              f"{abs(loss.item() - ref.item()):.2e}, max |grad diff| {gdiff:.2e}")
        print(f"all_reduce per call: forward {fwd.calls} ({fwd.bytes} bytes), "
              f"backward {bwd.calls} ({bwd.bytes} bytes)")

    if args.bench:
        times = []
        for _ in range(args.repeats + 1):
            leaf = local.clone().requires_grad_()
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            vocab_parallel_cross_entropy(leaf, target, vocab_start=lo, **opts).backward()
            if world > 1:
                dist.barrier()
            times.append(time.perf_counter() - t0)
        if rank == 0:
            med = statistics.median(times[1:])
            print(f"forward+backward wall time: median {1e3 * med:.1f} ms over {args.repeats} "
                  f"runs (threads/process {torch.get_num_threads()}; "
                  f"all: {', '.join(f'{1e3 * t:.0f}' for t in times[1:])} ms)")
    if launched:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
