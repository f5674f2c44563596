"""The Triton kernels of the vocab-parallel losses (crossent.torch._triton.vocab_parallel)
against float64 torch. On CPU: triton's interpreter (conftest.py), so tiny ragged shapes.

1. The kernels directly on the slices of an uneven 2- and 3-rank split, the exchange
   simulated here in float64 (max of the maxima, rescaled sum of the exp-sums): each
   slice's partials equal torch's, and the loss and gradient built from them equal
   torch.nn.functional.cross_entropy's (z_loss, softcap added by hand), for class weights,
   ignore_index, label smoothing, z_loss, softcap, float32/bfloat16/float16/float64, NaN
   rows, ragged vocabulary tiles.
2. backend="triton" through the public functions single-process (the kernels are seen to
   run): every reduction, num_items, the linear head.
3. A real 2-rank gloo run with backend="triton" (the children inherit
   TRITON_INTERPRET=1), and ranks disagreeing on the backend raising together:
   ``_check_gloo``, run by test_triton_vocab_parallel_adversarial.py's gloo test on a
   2-rank group inside its 3-rank run (one set of spawned processes, each paying torch's
   and triton's import once, for both).
"""

from __future__ import annotations

import math
import pathlib
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "torch" / "distributed"))
from dist_harness import torch_reference  # noqa: E402

from crossent.errors import InputError, UnsupportedError  # noqa: E402
from crossent.torch._triton import vocab_parallel as vp  # noqa: E402
from crossent.torch.distributed import (  # noqa: E402
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

pytestmark = pytest.mark.timeout(120)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter
N = 12
NAN_ROW, NAN_IGNORED = 2, 5  # a counted row and an ignored one get a NaN logit
# relative tolerance (of the largest reference value) for the loss (partials are float32)
# and the gradient (rounded once to the dtype; the interpreter truncates to bf16/fp16)
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-6, 2e-6),
       torch.bfloat16: (2e-6, 1.6e-2), torch.float16: (2e-6, 2e-3)}


def close(got, want, rtol, what):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    finite = want[torch.isfinite(want)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale + 1e-300,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def data(sizes, dtype, seed, nan):
    """Full logits and weights (float64 holding values exact in ``dtype``), targets."""
    g = torch.Generator().manual_seed(seed)
    v = sum(sizes)
    z = (torch.randn(N, v, generator=g, dtype=torch.float64) * 3).to(dtype).double()
    t = torch.randint(0, v, (N,), generator=g)
    t[NAN_IGNORED] = t[9] = -100
    t[0], t[1] = 0, v - 1  # the first and the last class
    w = (torch.rand(v, generator=g, dtype=torch.float64) + 0.5).to(dtype).double()
    w[int(t[3])] = 0.0  # a counted row whose target weighs 0
    if nan:
        z[NAN_ROW, v // 2] = math.nan
        z[NAN_IGNORED, 0] = math.nan
    return z, t, w


def slice_partials(zs, t, start, ws, eps, cap):
    """float64 torch: the partials of one slice (reference for the partials kernel)."""
    zc = zs if cap is None else cap * torch.tanh(zs / cap)
    n, size = zc.shape
    m = zc.amax(1) if size else torch.full((n,), -math.inf, dtype=zc.dtype)
    m_safe = torch.where(torch.isfinite(m), m, 0.0)
    s = torch.exp(zc - m_safe[:, None]).sum(1)
    own = (t != -100) & (t >= start) & (t < start + size)
    idx = torch.where(own, t - start, 0)
    z_y = zc.gather(1, idx[:, None]).squeeze(1) if size else torch.zeros(n, dtype=zc.dtype)
    zy = torch.where(own, z_y, 0.0)  # unweighted: the loss is w_y (lse - z_y), as torch's
    if ws is None:
        w_y, smooth = None, zc.sum(1)
    else:  # zero weights contribute exactly 0 to the smoothing sum (no 0 * inf)
        w_y = torch.where(own, ws[idx], 0.0) if size else torch.zeros(n, dtype=zc.dtype)
        smooth = torch.where(ws == 0, 0.0, zc * ws).sum(1)
    return m, s, zy, w_y, smooth


CASES = [  # sizes, dtype, eps, zeta, weighted, softcap, reduction, block, nan
    ([70, 45], torch.float32, 0.0, 0.0, False, None, "mean", None, False),
    ([70, 45], torch.float32, 0.1, 0.0, True, None, "none", 16, True),
    ([40, 33, 52], torch.float32, 0.0, 0.01, False, 3.0, "sum", None, True),
    ([40, 0, 85], torch.bfloat16, 0.1, 0.01, True, 3.0, "none", None, True),
    ([64, 51], torch.float16, 0.2, 0.0, True, 4.0, "mean", None, False),
    ([29, 60, 31], torch.float64, 0.1, 0.01, True, 2.5, "none", 32, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[0])}ranks-{c[1]}-"
                         f"eps{c[2]}-z{c[3]}-w{int(c[4])}-cap{c[5]}-{c[6]}-blk{c[7]}")
def test_kernels_on_slices_match_torch_float64(case):
    sizes, dtype, eps, zeta, weighted, cap, reduction, block, nan = case
    z, t, w = data(sizes, dtype, seed=len(sizes) + sizes[0], nan=nan)
    v = sum(sizes)
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    loss_tol, grad_tol = TOL[dtype]
    parts = []
    for start, size in zip(starts, sizes, strict=True):
        zs, ws = z[:, start:start + size], (w[start:start + size] if weighted else None)
        got = vp.vocab_parallel_partials(
            zs.to(dtype).to(DEVICE), t.to(DEVICE), start=start,
            weight=None if ws is None else ws.to(dtype).to(DEVICE), softcap=cap,
            smooth=eps > 0, block=block)
        want = slice_partials(zs, t, start, ws, eps, cap)
        names = ("m", "s", "zy", "wy", "smooth")
        for name, a, b in zip(names, got, want, strict=True):
            if a is None:
                assert (name == "wy" and not weighted) or (name == "smooth" and not eps)
                continue
            assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            close(a, b, loss_tol * 4, f"slice {start}: {name}")
        if nan:  # NaN exactly where the slice holds one, in m and s
            has = torch.isnan(zs).any(1)
            assert torch.equal(torch.isnan(got.m.cpu()), has)
            assert torch.equal(torch.isnan(got.s.cpu()), has)
        parts.append([p.double().cpu() if p is not None else None for p in got])

    # the exchange, simulated in float64: what the all-reduces MAX and SUM give
    ms = torch.stack([p[0] for p in parts])
    nan_rows = torch.isnan(ms).any(0)
    big = torch.where(torch.isnan(ms), -math.inf, ms).amax(0)
    big_safe = torch.where(torch.isfinite(big), big, 0.0)
    s = sum(torch.where(p[1] == 0, 0.0, p[1] * torch.exp(
        torch.where(torch.isfinite(p[0]), p[0], 0.0) - big_safe)) for p in parts)
    s = torch.where(nan_rows, math.nan, s)
    lse = big_safe + torch.log(s)
    zy = sum(p[2] for p in parts)
    valid = t != -100
    wy = sum(p[3] for p in parts) if weighted else valid.double()
    wtot = float(w.sum()) if weighted else float(v)
    a = (1 - eps) * wy + (eps / v) * wtot  # what multiplies p in the gradient
    loss = (1 - eps) * wy * (lse - zy) + zeta * lse ** 2
    if eps:
        loss = loss + (eps / v) * (wtot * lse - sum(p[4] for p in parts))
    loss = torch.where(valid, loss, 0.0)
    ref_in = z.clone().requires_grad_()
    ref = torch_reference(ref_in, t, w if weighted else None, eps, zeta, cap, "none")
    close(loss, ref, loss_tol * 10, "row losses from the partials")

    # the gradient kernel on each slice, given the global lse and coef
    g = torch.Generator().manual_seed(1)
    go = torch.randn(N, generator=g, dtype=torch.float64)
    if reduction == "mean":
        denom = (w[t[valid]].sum() if weighted else valid.sum()).double()
        scale = (go[0] / denom).expand(N)
        torch_reference(ref_in, t, w if weighted else None, eps, zeta, cap,
                        "mean").backward(go[0])
    elif reduction == "sum":
        scale = go[0].expand(N)
        torch_reference(ref_in, t, w if weighted else None, eps, zeta, cap,
                        "sum").backward(go[0])
    else:
        scale = go
        ref.backward(go)
    coef = a + 2 * zeta * lse
    grads = []
    for start, size in zip(starts, sizes, strict=True):
        zs = z[:, start:start + size].to(dtype).to(DEVICE)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        gr = vp.vocab_parallel_grad(
            zs, t.to(DEVICE), lse.to(acc).to(DEVICE), coef.to(acc).to(DEVICE),
            scale.to(acc).to(DEVICE), start=start, num_classes=v,
            weight=w[start:start + size].to(dtype).to(DEVICE) if weighted else None,
            label_smoothing=eps, softcap=cap, block=block)
        assert gr.dtype == dtype and gr.shape == zs.shape
        grads.append(gr.cpu())
    grad = torch.cat(grads, 1)
    if nan:  # a NaN row's gradient is NaN on every slice (the ignored one's too, as torch)
        assert torch.isnan(grad[NAN_ROW]).all() and torch.isnan(grad[NAN_IGNORED]).all()
    close(grad, ref_in.grad, grad_tol, "gradient")


def test_in_place_gradient_and_empty_inputs():
    """The gradient may overwrite the logits (the linear head's chunk buffer); no rows or
    no classes launch nothing and give the empty slice's partials."""
    z, t, _ = data([50], torch.float32, seed=3, nan=False)
    zf = z.float().to(DEVICE)
    lse, coef, scale = torch.logsumexp(zf, 1), torch.ones(N, device=DEVICE), \
        torch.full((N,), 0.5, device=DEVICE)
    want = vp.vocab_parallel_grad(zf, t.to(DEVICE), lse, coef, scale, start=0, num_classes=50)
    buf = zf.clone()
    got = vp.vocab_parallel_grad(buf, t.to(DEVICE), lse, coef, scale, start=0, num_classes=50,
                                 out=buf)
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ref = (torch.softmax(z, 1) - F.one_hot(t.clamp(min=0), 50)) * 0.5
    ref[t == -100] = 0
    close(got, ref, 2e-6, "in-place gradient")
    empty = vp.vocab_parallel_partials(torch.zeros(3, 0, device=DEVICE),
                                       torch.zeros(3, dtype=torch.long, device=DEVICE),
                                       start=7, smooth=True)
    assert torch.equal(empty.m.cpu(), torch.full((3,), -math.inf))
    assert not empty.s.any() and not empty.zy.any() and not empty.smooth.any()
    none = vp.vocab_parallel_partials(torch.zeros(0, 5, device=DEVICE),
                                      torch.zeros(0, dtype=torch.long, device=DEVICE), start=0)
    assert none.m.shape == (0,)


@pytest.fixture
def launches(monkeypatch):
    """How often each vocab-parallel kernel ran."""
    count = {"partials": 0, "grad": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            count[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(vp, "vocab_parallel_partials",
                        spy("partials", vp.vocab_parallel_partials))
    monkeypatch.setattr(vp, "vocab_parallel_grad", spy("grad", vp.vocab_parallel_grad))
    return count


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "num_items"])
def test_public_function_single_process(reduction, launches):
    z, t, w = data([90], torch.float32, seed=5, nan=False)
    kw = dict(label_smoothing=0.1, z_loss=0.01, softcap=4.0)
    red = "sum" if reduction == "num_items" else reduction
    items = 7.0 if reduction == "num_items" else None
    local = z.float().to(DEVICE).requires_grad_()
    out = vocab_parallel_cross_entropy(local, t.to(DEVICE), weight=w.float().to(DEVICE),
                                       reduction=red, num_items=items, backend="triton", **kw)
    go = torch.randn(out.shape, dtype=torch.float64)
    out.backward(go.float().to(DEVICE))
    assert launches == {"partials": 1, "grad": 1}
    ref_in = z.clone().requires_grad_()
    ref = torch_reference(ref_in, t, w, 0.1, 0.01, 4.0, red)
    if items is not None:
        ref = ref / items
    ref.backward(go)
    close(out, ref, 2e-6, "loss")
    close(local.grad, ref_in.grad, 2e-6, "gradient")


def test_linear_head_single_process(launches):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(N, 6, generator=g, dtype=torch.float64)
    w = torch.randn(40, 6, generator=g, dtype=torch.float64)
    t = torch.randint(0, 40, (N,), generator=g)
    t[4] = -100
    xr, wr = (p.float().to(DEVICE).requires_grad_() for p in (x, w))
    out = vocab_parallel_linear_cross_entropy(xr, wr, t.to(DEVICE), label_smoothing=0.1,
                                              softcap=3.0, chunk_size=5, backend="triton")
    out.backward()
    assert launches == {"partials": 3, "grad": 3}  # one of each per chunk
    rx, rw = (p.clone().requires_grad_() for p in (x, w))
    ref = torch_reference(F.linear(rx, rw), t, None, 0.1, 0.0, 3.0, "mean")
    ref.backward()
    close(out, ref, 2e-6, "loss")
    close(xr.grad, rx.grad, 1e-5, "dx")
    close(wr.grad, rw.grad, 1e-5, "dW")


def test_forced_triton_where_it_cannot_run_is_refused(monkeypatch):
    """Without the interpreter (and no GPU), backend='triton' raises UnsupportedError naming
    it; "auto" then takes the row-block path and gives the same numbers."""
    if DEVICE == "cuda":
        pytest.skip("CUDA tensors run the kernels")
    z, t, _ = data([20], torch.float32, seed=8, nan=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UnsupportedError, match="backend='triton'"):
        vocab_parallel_cross_entropy(z.float(), t, backend="triton")
    out = vocab_parallel_cross_entropy(z.float(), t)  # auto: the row-block path
    close(out, torch_reference(z, t), 2e-6, "auto on CPU")


def _check_gloo(rank, world, group=None):
    """Run on the ranks of ``group`` (2 of them; None: the default group)."""
    sizes = [37, 58]
    z, t, w = data(sizes, torch.float32, seed=9, nan=True)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    local = z[:, lo:hi].float().requires_grad_()
    kw = dict(label_smoothing=0.1, z_loss=0.01, softcap=4.0)
    out = vocab_parallel_cross_entropy(local, t, vocab_start=lo, weight=w[lo:hi].float(),
                                       reduction="none", backend="triton", group=group, **kw)
    go = torch.linspace(-1, 1, N, dtype=torch.float64)
    out.backward(go.float())
    ref_in = z.clone().requires_grad_()
    ref = torch_reference(ref_in, t, w, 0.1, 0.01, 4.0, "none")
    ref.backward(go)
    close(out, ref, 2e-6, f"rank {rank} loss")
    close(local.grad, ref_in.grad[:, lo:hi], 2e-6, f"rank {rank} gradient")
    assert torch.isnan(out[NAN_ROW]) and out[NAN_IGNORED] == 0
    # the linear head on the same ranks
    g = torch.Generator().manual_seed(10)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64)
    wl = torch.randn(sum(sizes), 4, generator=g, dtype=torch.float64)
    xr, wr = x.float().requires_grad_(), wl[lo:hi].float().requires_grad_()
    lin = vocab_parallel_linear_cross_entropy(xr, wr, t, vocab_start=lo, backend="triton",
                                              group=group)
    lin.backward()
    rx, rw = x.clone().requires_grad_(), wl.clone().requires_grad_()
    rl = torch_reference(F.linear(rx, rw), t)
    rl.backward()
    close(lin, rl, 2e-6, f"rank {rank} linear loss")
    close(xr.grad, rx.grad, 1e-5, f"rank {rank} dx")
    close(wr.grad, rw.grad[lo:hi], 1e-5, f"rank {rank} dW")
    # ranks disagreeing on the backend: the same InputError on both, then the group works
    for backend in ("triton", "rowblock"):
        mine = backend if rank == 0 else ("rowblock" if backend == "triton" else "triton")
        with pytest.raises(InputError, match=r"backend differs across the ranks of the group"):
            vocab_parallel_cross_entropy(local.detach(), t, vocab_start=lo, backend=mine,
                                         group=group)
    again = vocab_parallel_cross_entropy(local.detach(), t, vocab_start=lo, backend="triton",
                                         reduction="sum", group=group)
    assert torch.isnan(again)  # the NaN row, on both ranks
