"""Adversarial checks of backend="triton" in the vocab-parallel functions
(crossent.torch._triton.vocab_parallel). On CPU: triton's interpreter (conftest.py), so tiny
ragged shapes; the vocabulary tile is lowered to 16 classes (several tiles per row, a
ragged last one) through the public functions.

References are independent of crossent: torch.nn.functional.cross_entropy / F.linear in
float64 on the gathered logits (dist_harness.torch_reference: z_loss and softcap by hand).

1. Single process: every option (class weights incl. zero weights and weights summing to
   0, ignore_index incl. every row ignored and a non-default one, label smoothing 0 / 1,
   z_loss, softcap, reductions none / sum / mean, num_items), float16 / bfloat16 /
   float32 / float64, non-finite logits (1e4, -1e4, a row of -inf, +inf, NaN) with and
   without softcap; N = 0, one row, one class; strided, transposed, expanded and 3-d
   logits; grad_output per row; backward twice, double backward; the linear head; two
   threads calling at once.
2. No host synchronisation in the Triton route: no aten op that reads a device value
   into Python (``_local_scalar_dense``, ``nonzero``, ``item``) runs in backward, nor in
   forward outside the agreement.
3. One 3-rank gloo run with backend="triton" (an empty slice, NaN on one rank only), and
   ranks disagreeing on triton / rowblock / auto raising the same InputError; in the same
   processes, on a group of ranks 0 and 1, test_triton_vocab_parallel.py's 2-rank checks
   (``_check_gloo``): one spawn, each child importing torch and triton once, for both.
"""

from __future__ import annotations

import functools
import math
import pathlib
import sys
import threading
import traceback

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "torch" / "distributed"))
import torch.distributed as dist  # noqa: E402
from dist_harness import torch_reference  # noqa: E402
from test_triton_vocab_parallel import _check_gloo  # noqa: E402

from crossent.errors import InputError, UnsupportedError  # noqa: E402
from crossent.torch._triton import vocab_parallel as vp  # noqa: E402
from crossent.torch.distributed import (  # noqa: E402
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

pytestmark = pytest.mark.timeout(180)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter
# the loss from float32 partials; the gradient rounded once to the dtype
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles of 16 classes: every row of more than 16 classes takes several, the last
    ragged."""
    config = vp.kernel_config
    monkeypatch.setattr(vp, "kernel_config", lambda v, size, block=None: config(v, size, 16))


def close(got, want, dtype, what):
    tol = TOL[dtype]
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    finite = want[torch.isfinite(want)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(scale, 1.0),
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def ce(z, t, dtype, go=None, **kw):
    """backend="triton": the loss and logit gradient of the float64 logits ``z`` in
    ``dtype`` (weight cast too)."""
    local = z.detach().to(dtype).to(DEVICE).requires_grad_()
    w = kw.pop("weight", None)
    out = vocab_parallel_cross_entropy(
        local, t.to(DEVICE), weight=None if w is None else w.to(dtype).to(DEVICE),
        backend="triton", **kw)
    out.backward(torch.ones_like(out) if go is None else go.to(dtype).to(DEVICE))
    return out, local.grad


def ref(z, t, go=None, weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None,
        reduction="mean", ignore_index=-100, num_items=None):
    zin = z.detach().double().clone().requires_grad_()
    out = torch_reference(zin, t, weight, label_smoothing, z_loss, softcap, reduction,
                          ignore_index)
    if num_items is not None:
        out = out / num_items
    out.backward(torch.ones_like(out) if go is None else go)
    return out, zin.grad


def nonfinite(v=37):
    g = torch.Generator().manual_seed(31)
    z = torch.randn(8, v, generator=g, dtype=torch.float64) * 2
    z[0, 3], z[0, 20] = 1e4, -1e4
    z[1] = -1e4
    z[1, 33] = 1e4  # the max in the third tile
    z[2] = -math.inf  # counted: loss NaN (torch)
    z[3, 18] = math.inf  # counted: NaN
    z[4, 35] = math.nan  # counted, in the ragged last tile
    z[5, 0] = math.nan  # ignored: loss 0, gradient NaN (torch)
    z[6, :17] = -math.inf  # the target's logit -inf: loss inf
    t = torch.tensor([3, 33, 4, 1, 2, -100, 2, 36])
    return z, t


OPTIONS = [  # keyword arguments; go: grad_output (per row for "none")
    dict(),
    dict(reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=6.0, weighted=True),
    dict(reduction="sum", label_smoothing=1.0, weighted=True),
    dict(reduction="sum", num_items=3.5, z_loss=1e-2, softcap=30.0),
    dict(reduction="mean", weighted=True, label_smoothing=0.3, softcap=2.0),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16,
                                   torch.float16])
def test_every_option_nonfinite_logits_every_dtype(dtype):
    z, t = nonfinite()
    z = z.to(dtype).double()  # values exact in dtype
    w = (torch.linspace(0.25, 2.0, 37, dtype=torch.float64)).to(dtype).double()
    w[5] = 0.0  # a zero class weight (not a target here)
    go = torch.linspace(-1.5, 2.0, 8, dtype=torch.float64)
    options = OPTIONS if dtype == torch.float64 else OPTIONS[1::2]
    for opts in options:
        kw = {k: v for k, v in opts.items() if k != "weighted"}
        if opts.get("weighted"):
            kw["weight"] = w
        red = kw.get("reduction", "mean")
        gout = go if red == "none" else torch.tensor(-0.75, dtype=torch.float64)
        out, grad = ce(z, t, dtype, gout, **kw)
        want, wgrad = ref(z, t, gout, **kw)
        assert out.dtype == dtype and grad.dtype == dtype
        close(out, want, dtype, f"{dtype} {opts} loss")
        close(grad, wgrad.to(dtype), dtype, f"{dtype} {opts} gradient")


@pytest.mark.parametrize("case", ["zero_weights", "weights_sum_to_zero", "all_ignored",
                                  "ignore_index_0", "num_items_tensor"])
def test_degenerate_denominators_and_ignore_index(case):
    g = torch.Generator().manual_seed(32)
    z = torch.randn(6, 21, generator=g, dtype=torch.float64)
    t = torch.tensor([1, -100, 3, 0, 20, 6])
    w = torch.rand(21, generator=g, dtype=torch.float64) + 0.5
    kw: dict = dict(weight=w)
    if case == "zero_weights":
        kw["weight"] = torch.zeros(21, dtype=torch.float64)
    elif case == "weights_sum_to_zero":
        w[t[t >= 0]] = torch.tensor([1.0, -2.0, 0.5, 0.25, 0.25], dtype=torch.float64)
    elif case == "all_ignored":
        t = torch.full((6,), -100)
    elif case == "ignore_index_0":  # a real class id ignored; -100 is then a bad id
        t = torch.tensor([1, 0, 3, 0, 20, 6])
        kw.update(ignore_index=0, label_smoothing=0.2)
    for red in ("mean", "sum", "none"):
        go = torch.linspace(-1, 1, 6, dtype=torch.float64) if red == "none" else None
        extra = {}
        if case == "num_items_tensor":
            if red != "sum":
                continue
            extra = dict(num_items=torch.tensor(4, device=DEVICE))
        out, grad = ce(z, t, torch.float64, go, reduction=red, **kw, **extra)
        want, wgrad = ref(z, t, go, reduction=red, **kw,
                          num_items=4.0 if extra else None)
        close(out, want, torch.float64, f"{case} {red} loss")
        close(grad, wgrad, torch.float64, f"{case} {red} gradient")


def test_shapes_strides_and_views():
    g = torch.Generator().manual_seed(33)
    for n, v in ((0, 20), (1, 20), (3, 1), (1, 1), (5, 33)):
        z = torch.randn(n, v, generator=g, dtype=torch.float64)
        t = torch.randint(0, v, (n,), generator=g)
        go = torch.linspace(-1, 1, n, dtype=torch.float64)
        out, grad = ce(z, t, torch.float32, go, reduction="none", label_smoothing=0.1,
                       softcap=3.0)
        want, wgrad = ref(z, t, go, reduction="none", label_smoothing=0.1, softcap=3.0)
        assert out.shape == (n,) and grad.shape == (n, v)
        close(out, want, torch.float32, f"N={n} V={v} loss")
        close(grad, wgrad, torch.float32, f"N={n} V={v} gradient")
    base = torch.randn(6, 60, generator=g, dtype=torch.float32)
    t = torch.tensor([0, 3, -100, 17, 2, 20])
    go = torch.linspace(-2, 1, 6, dtype=torch.float64)
    views = {
        "column slice": lambda b: b[:, 7:28],
        "every other column": lambda b: b[:, ::2][:, :21],
        "transposed": lambda b: b[:, :21].t().contiguous().t(),
        "expanded row": lambda b: b[0, :21].expand(6, 21),
        "3-d view": lambda b: b[:, :21].reshape(3, 2, 21),
    }
    for name, view in views.items():
        leaf = base.clone().to(DEVICE).requires_grad_()
        local = view(leaf)
        out = vocab_parallel_cross_entropy(local, t.to(DEVICE).reshape(local.shape[:-1]),
                                           z_loss=1e-3, reduction="none", backend="triton")
        out.backward(go.float().to(DEVICE).reshape(out.shape))
        ref_leaf = base.double().clone().requires_grad_()
        rl = torch_reference(view(ref_leaf).reshape(6, 21), t, None, 0.0, 1e-3, None, "none")
        rl.backward(go)
        close(out.reshape(-1), rl, torch.float32, f"{name} loss")
        close(leaf.grad, ref_leaf.grad, torch.float32, f"{name} gradient")


def test_backward_twice_double_backward_and_refusals():
    g = torch.Generator().manual_seed(34)
    z = torch.randn(4, 19, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 18, -100, 7])
    local = z.clone().to(DEVICE).requires_grad_()
    out = vocab_parallel_cross_entropy(local, t.to(DEVICE), reduction="none", softcap=4.0,
                                       backend="triton")
    go = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    out.backward(go.to(DEVICE), retain_graph=True)
    out.backward(go.to(DEVICE))
    _, wgrad = ref(z, t, go, reduction="none", softcap=4.0)
    close(local.grad, 2 * wgrad, torch.float64, "backward twice")
    again = vocab_parallel_cross_entropy(local, t.to(DEVICE), backend="triton")
    with pytest.raises(UnsupportedError, match="double backward"):
        torch.autograd.grad(again, local, create_graph=True)
    with pytest.raises(UnsupportedError, match="weight"):
        vocab_parallel_cross_entropy(local, t.to(DEVICE), backend="triton",
                                     weight=torch.ones(19, dtype=torch.float64,
                                                       device=DEVICE, requires_grad=True))


@pytest.mark.parametrize("case", ["softcap_nan", "zero_weights", "empty"])
def test_linear_head(case):
    g = torch.Generator().manual_seed(35)
    n = 0 if case == "empty" else 7
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    lw = torch.randn(23, 4, generator=g, dtype=torch.float64) * 3
    b = torch.randn(23, generator=g, dtype=torch.float64)
    t = torch.randint(0, 23, (n,), generator=g)
    cw = torch.rand(23, generator=g, dtype=torch.float64) + 0.5
    kw: dict = dict(label_smoothing=0.1, z_loss=1e-3, softcap=2.0, weight=cw)
    if case == "softcap_nan":
        x[2, 1] = math.nan
        t[4] = -100
    elif case == "zero_weights":
        kw = dict(weight=torch.zeros(23, dtype=torch.float64))
        t[1] = -100
    for red in ("mean", "none"):
        xs, ws, bs = (p.clone().to(DEVICE).requires_grad_() for p in (x, lw, b))
        out = vocab_parallel_linear_cross_entropy(
            xs, ws, t.to(DEVICE), local_bias=bs, chunk_size=3, backend="triton",
            reduction=red, **{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v)
                              for k, v in kw.items()})
        go = torch.linspace(-1, 1, n, dtype=torch.float64) if red == "none" else \
            torch.tensor(1.5, dtype=torch.float64)
        out.backward(go.to(DEVICE))
        xr, wr, br = (p.clone().requires_grad_() for p in (x, lw, b))
        want = torch_reference(F.linear(xr, wr, br), t, kw.get("weight"),
                               kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0),
                               kw.get("softcap"), red)
        want.backward(go)
        close(out, want, torch.float64, f"{case} {red} loss")
        for name, a, w in (("dx", xs.grad, xr.grad), ("dW", ws.grad, wr.grad),
                           ("db", bs.grad, br.grad)):
            close(a, w, torch.float64, f"{case} {red} {name}")


def test_two_threads_at_once():
    """No process group: two Python threads calling backend="triton" at once both get
    torch's numbers (triton's interpreter is not thread-safe: launches are serialised)."""
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def data(seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(5, 23, generator=g, dtype=torch.float64),
                torch.randint(0, 23, (5,), generator=g))

    def call(seed):
        try:
            z, t = data(seed)
            start.wait()
            for _ in range(3):
                results[seed] = ce(z, t, torch.float32, softcap=3.0, label_smoothing=0.1)
        except BaseException as e:  # handed to the test thread
            errors.append(e)

    threads = [threading.Thread(target=call, args=(s,)) for s in (1, 2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    for seed in (1, 2):
        z, t = data(seed)
        want, wgrad = ref(z, t, softcap=3.0, label_smoothing=0.1)
        close(results[seed][0], want, torch.float32, f"thread {seed} loss")
        close(results[seed][1], wgrad, torch.float32, f"thread {seed} gradient")


class _HostReads(TorchDispatchMode):
    """Records every read of a device value into Python made by crossent: the aten ops
    that do it (``_local_scalar_dense``: ``item``/``bool``/``int``; ``nonzero``) and
    ``Tensor.tolist`` (not an aten op: wrapped), each with the crossent function asking."""

    SYNCING = ("_local_scalar_dense", "nonzero", "is_nonzero")

    def __init__(self, monkeypatch):
        super().__init__()
        self.seen: list[tuple[str, str]] = []
        tolist = torch.Tensor.tolist

        def spied(t, *args, **kwargs):
            self._note("tolist")
            return tolist(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "tolist", spied)

    def _note(self, what):
        frames = [f for f in traceback.extract_stack() if "crossent" in f.filename
                  and "tests" not in f.filename]
        if frames:
            self.seen.append((what, frames[-1].name))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            self._note(func.__name__)
        return func(*args, **(kwargs or {}))


def test_no_host_sync_in_the_triton_route(monkeypatch):
    """Forward: one read of a device value, the agreement's table (which carries the
    target check too); backward: none. (On CPU the same code runs as on CUDA: each read
    here is a host synchronisation there.)"""
    g = torch.Generator().manual_seed(36)
    z = torch.randn(5, 20, generator=g).to(DEVICE).requires_grad_()
    t = torch.tensor([0, 19, -100, 7, 3], device=DEVICE)
    w = torch.rand(20, generator=g).to(DEVICE)
    reads = _HostReads(monkeypatch)
    for kw in (dict(reduction="mean", weight=w, label_smoothing=0.1, softcap=3.0),
               dict(reduction="none", z_loss=1e-3)):
        x = torch.randn(5, 3, generator=g).to(DEVICE).requires_grad_()
        lw = torch.randn(20, 3, generator=g).to(DEVICE).requires_grad_()
        calls = (functools.partial(vocab_parallel_cross_entropy, z, t, **kw),
                 functools.partial(vocab_parallel_linear_cross_entropy, x, lw, t, chunk_size=2,
                                   **kw))
        for call in calls:
            with reads:
                out = call(backend="triton")
            assert reads.seen == [("tolist", "agree")], (kw, reads.seen)
            reads.seen = []
            with reads:
                out.backward(torch.ones_like(out))
            assert not reads.seen, (kw, reads.seen)


SIZES = [21, 0, 18]  # uneven, an empty slice on the middle rank


def _group_data():
    g = torch.Generator().manual_seed(37)  # the same stream on every rank
    v = sum(SIZES)
    z = torch.randn(7, v, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, v, (7,), generator=g)
    t[5] = -100
    t[3] = 30  # a target on the last rank, whose row is -inf on rank 0's whole slice
    z[1, 35] = math.nan  # a counted row: NaN on the last rank's slice only
    z[2, 19] = math.inf  # a counted row: +inf on rank 0's slice only (its last tile)
    z[3, :21] = -math.inf
    z[5, 2] = math.nan  # an ignored row holding NaN
    z[6, 4] = 1e4
    w = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
    w[7] = 0.0
    return z, t, w


def _check_group(rank, world):
    config = vp.kernel_config  # tiles of 16 classes in the children too
    vp.kernel_config = lambda v, size, block=None: config(v, size, 16)
    lo = sum(SIZES[:rank])
    hi = lo + SIZES[rank]
    z, t, w = _group_data()
    go = torch.linspace(-1, 2, 7, dtype=torch.float64)
    for dtype, kw in ((torch.float32, dict(reduction="none", weight=w, label_smoothing=0.1,
                                           z_loss=1e-3, softcap=5.0)),
                      (torch.bfloat16, dict(reduction="mean", weight=w))):
        red = kw["reduction"]
        wt = kw.get("weight")
        local = z[:, lo:hi].to(dtype).clone().requires_grad_()
        out = vocab_parallel_cross_entropy(
            local, t, vocab_start=lo, backend="triton",
            **{**kw, "weight": None if wt is None else wt[lo:hi].to(dtype)})
        gout = go if red == "none" else torch.tensor(0.7, dtype=torch.float64)
        out.backward(gout.to(dtype))
        want, wgrad = ref(z.to(dtype).double(), t, gout,
                          **{**kw, "weight": None if wt is None else wt.to(dtype).double()})
        what = f"rank {rank} {dtype} {red}"
        if red == "none":
            # (the softcap makes row 2's +inf logit finite: 5 tanh(inf) = 5)
            assert torch.isnan(out[1]) and out[5] == 0, what
        else:
            assert torch.isnan(out), what  # on every rank
        if hi > lo:
            assert torch.isnan(local.grad[1]).all() and torch.isnan(local.grad[5]).all()
        close(out, want, dtype, what + " loss")
        close(local.grad, wgrad[:, lo:hi].to(dtype), dtype, what + " gradient")
    # the linear head: NaN in the last rank's weight slice reaches every rank's dx
    g = torch.Generator().manual_seed(38)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    lw = torch.randn(sum(SIZES), 3, generator=g, dtype=torch.float64)
    lw[30, 1] = math.nan
    xs, ws = x.clone().requires_grad_(), lw[lo:hi].clone().requires_grad_()
    out = vocab_parallel_linear_cross_entropy(xs, ws, t, vocab_start=lo, chunk_size=4,
                                              backend="triton", softcap=4.0)
    out.backward()
    counted = t != -100
    assert torch.isnan(out) and torch.isnan(xs.grad[counted]).all(), f"rank {rank} linear"
    # ranks disagreeing on the backend: the same InputError on every rank, nothing hangs
    for values in (("triton", "rowblock", "triton"), ("auto", "triton", "triton"),
                   ("triton", "triton", "rowblock")):
        shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        want_msg = (f"backend differs across the ranks of the group ({shown}); every rank "
                    f"must pass the same value")
        with pytest.raises(InputError) as info:
            vocab_parallel_cross_entropy(z[:, lo:hi].float(), t, vocab_start=lo,
                                         backend=values[rank])
        assert str(info.value) == want_msg
        with pytest.raises(InputError) as info:
            vocab_parallel_linear_cross_entropy(x, lw[lo:hi], t, vocab_start=lo,
                                                backend=values[rank])
        assert str(info.value) == want_msg
    again = vocab_parallel_cross_entropy(torch.nan_to_num(z[:, lo:hi]), t, vocab_start=lo,
                                         backend="triton")
    assert torch.isfinite(again)


def _check_groups(rank, world):
    _check_group(rank, world)
    pair = dist.new_group([0, 1])  # every rank of the default group takes part
    if rank < 2:
        _check_gloo(rank, 2, group=pair)


@pytest.mark.gloo_group(_check_groups, len(SIZES), timeout=150)
def test_gloo_ranks_with_the_kernels(gloo_group):
    """The 3-rank checks (``_check_group``) on the default group, then the 2-rank ones of
    test_triton_vocab_parallel.py (``_check_gloo``) on a group of ranks 0 and 1. The
    processes start with the first test of tests/triton (conftest.py) and run beside the
    other tests; here the test waits for them (150 s from their start at most)."""
    if DEVICE == "cuda":
        pytest.skip("gloo on CPU tensors: the interpreter's case")
    gloo_group()
