"""Few classes, many rows (token classification, segmentation), forward + backward (float32,
or ``--dtype``):
torch eager against ``crossent.torch.cross_entropy`` on each of its CPU routes, in one
process on the same logits: the row-block kernel (``backend="rowblock"``), torch's own
kernel through crossent (``"native"``), the small-batch kernel (``crossent.torch._small``,
``(N, C)`` logits only; forced by lifting ``_backends.NATIVE_MAX_LOGITS``) and what
``"auto"`` chooses.

Every round runs each contender once, in an order that rotates and reverses from round to
round (``small_inputs.paired``, three warm-up rounds); per shape it prints the medians (ms)
and the median of the per-round ratios to eager.

    python benchmarks/few_classes.py                        # the default shapes
    python benchmarks/few_classes.py 131072x21 8x21x128x128 # N x C [x d1 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os

import torch
import torch.nn.functional as F
from small_inputs import paired  # benchmarks/ is on the path when run as a script

import crossent.torch as xt
from crossent.torch import _backends

SHAPES = ["262144x2", "131072x9", "131072x21", "65536x64", "32768x150", "16384x300",
          "8192x1000", "8x21x128x128", "4x150x64x64", "2x19x256x256"]


@contextlib.contextmanager
def small_kernel_everywhere():
    """``"auto"`` sends every float32 ``(N, C)`` call that fits to the small kernel."""
    saved = _backends.NATIVE_MAX_LOGITS, _backends.SMALL_MIN_LOGITS
    _backends.NATIVE_MAX_LOGITS, _backends.SMALL_MIN_LOGITS = 1 << 62, 1
    try:
        yield
    finally:
        _backends.NATIVE_MAX_LOGITS, _backends.SMALL_MIN_LOGITS = saved


def contenders_for(shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                   prob: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(dtype)
    if prob:  # soft labels (distillation, mixup): rows of a softmax
        t = torch.softmax(torch.randn(*shape, generator=g), 1).to(dtype)
    else:
        t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)

    def step(fn, context=contextlib.nullcontext):
        def run():
            with context():
                z = x.detach().requires_grad_()
                torch.autograd.grad(fn(z, t), z)
        return run

    out = {
        "eager": step(F.cross_entropy),
        "auto": step(xt.cross_entropy),
        "rowblock": step(lambda z, t: xt.cross_entropy(z, t, backend="rowblock")),
        "native": step(lambda z, t: xt.cross_entropy(z, t, backend="native")),
    }
    if len(shape) == 2 and dtype in (torch.float32, torch.float64) and not prob:
        out["small"] = step(xt.cross_entropy, small_kernel_everywhere)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shapes", nargs="*", default=SHAPES, help="N x C [x d1 ...]")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--dtype", default="float32",
                   choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--probabilities", action="store_true",
                   help="probability targets instead of class indices")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}, {args.dtype}"
          f"{', probability targets' if args.probabilities else ''}")
    names = ["eager", "auto", "rowblock", "native", "small"]
    print(f"{'shape':>16} " + " ".join(f"{n + ' ms':>11}" for n in names)
          + "  " + " ".join(f"{n + '/eager':>14}" for n in names[1:]))
    for spec in args.shapes:
        shape = tuple(int(k) for k in spec.split("x"))
        assert math.prod(shape) > 0
        med, rat = paired(contenders_for(shape, dtype, args.probabilities), args.rounds)
        med = {name: us / 1e3 for name, us in med.items()}  # ms
        print(f"{spec:>16} " + " ".join(f"{med[n]:11.1f}" if n in med else f"{'-':>11}"
                                        for n in names)
              + "  " + " ".join(f"{rat[n]:14.2f}" if n in rat else f"{'-':>14}"
                                for n in names[1:]), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
