"""Review (H94) of ``statistics=`` and K-dimensional inputs / ``shift=True`` on the CPU
routes ("auto", "native", "rowblock"): every statistic against an independent float64
reference from the whole logits (torch.logsumexp, log_softmax, argmax, special.entr),
K-dimensional losses, gradients and statistics' shapes against
``torch.nn.functional.cross_entropy`` in float64 (channels_last, permuted, probability
targets), the linear head's ``shift=True`` against Hugging Face's ForCausalLMLoss
(pad the labels with ignore_index, shift by one, flatten), autograd modes and
``torch.compile`` (aot_eager and dynamo's eager backend). No bug was found: all guards."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt

ALL = ("lse", "z_loss", "target_logprob", "accuracy", "entropy")
PROB = ("lse", "z_loss", "entropy")
BACKENDS = ["auto", "native", "rowblock"]
INF, NAN = math.inf, math.nan


def ref_stats(z, y, *, ignore_index=-100, softcap=None, z_loss=0.0):
    """float64 statistics of (N, C, d1, ...) or (N, C) logits, class axis 1."""
    z = z.detach().double().movedim(1, -1)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, -1)
    counted = y != ignore_index
    yy = torch.where(counted, y, 0).long()
    out = {"lse": lse, "z_loss": z_loss * lse.square() if z_loss else torch.zeros_like(lse),
           "entropy": torch.special.entr(torch.softmax(z, -1)).sum(-1),
           "target_logprob": torch.log_softmax(z, -1).gather(-1, yy[..., None])[..., 0],
           "accuracy": z.argmax(-1) == yy}
    for k, v in out.items():
        out[k] = torch.where(counted, v, False if v.dtype == torch.bool else NAN)
    return out, counted


def check(stats, want, counted, dtype, tol=1e-5):
    assert torch.equal(stats.counted, counted)
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name, ref in want.items():
        got = getattr(stats, name)
        assert got is not None and got.shape == ref.shape, name
        assert not got.requires_grad and got.grad_fn is None, name
        if name == "accuracy":
            assert got.dtype == torch.bool and torch.equal(got, ref), name
            continue
        assert got.dtype == cdtype, name
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol, equal_nan=True,
                                   msg=name)


def tol_of(dtype):
    return 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5


# ---- K-dimensional cross_entropy: layouts, ignore_index, reduction, gradients


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16,
                                   torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 300, 4, 2)])
def test_k_dimensional_loss_gradient_and_statistics(backend, dtype, layout, shape):
    g = torch.Generator().manual_seed(11)
    z = (torch.randn(shape, generator=g) * 2).to(dtype)
    if layout == "channels_last":
        z = z.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":
        z = z.movedim(1, -1).contiguous().movedim(-1, 1)
    n, c = shape[:2]
    y = torch.randint(0, c, (n, *shape[2:]), generator=g)
    y.view(-1)[::3] = 1  # ignore_index 1 at some positions
    w = torch.rand(c, generator=g).to(dtype)
    for kw in ({"reduction": "none"}, {"label_smoothing": 0.1, "weight": w},
               {"reduction": "sum", "num_items": 3}):
        zz = z.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        loss, stats = xt.cross_entropy(zz, y, ignore_index=1, backend=backend,
                                       statistics=ALL, **kw)
        z64 = z.detach().double().requires_grad_()
        kk = dict(kw)
        num_items = kk.pop("num_items", None)
        if "weight" in kk:
            kk["weight"] = kk["weight"].double()
        ref = F.cross_entropy(z64, y, ignore_index=1, **kk)
        if num_items:
            ref = ref / num_items
        assert loss.shape == ref.shape  # "none": (N, d1, d2)
        torch.testing.assert_close(loss.double(), ref, rtol=tol_of(dtype), atol=tol_of(dtype))
        go = torch.randn(loss.shape, generator=g)
        got, = torch.autograd.grad((loss * go.to(loss.dtype)).sum(), zz)
        want, = torch.autograd.grad((ref * go.double()).sum(), z64)
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=tol_of(dtype), atol=tol_of(dtype))
        stol = 1e-3 if dtype == torch.float16 else 1e-5
        want_stats, counted = ref_stats(z, y, ignore_index=1)
        assert stats.counted.shape == (n, *shape[2:])
        check(stats, want_stats, counted, dtype, tol=stol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_k_dimensional_probability_targets_channels_last(backend, dtype):
    g = torch.Generator().manual_seed(12)
    shape = (2, 7, 3, 4)
    z = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    t = torch.softmax(torch.randn(shape, generator=g), 1).to(dtype)
    t = t.contiguous(memory_format=torch.channels_last)
    zl = 0.0 if backend == "native" else 0.1
    for kw in ({"reduction": "none"}, {"label_smoothing": 0.2,
                                       "weight": torch.rand(7, generator=g).to(dtype)}):
        zz, tt = z.clone().requires_grad_(), t.clone().requires_grad_()
        loss, stats = xt.cross_entropy(zz, tt, backend=backend, statistics=PROB, z_loss=zl,
                                       **kw)
        z64, t64 = z.double().requires_grad_(), t.double().requires_grad_()
        kk = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        lse = torch.logsumexp(z64, 1)
        ref = F.cross_entropy(z64, t64, **kk)
        ref = ref + (zl * lse.square() if kk.get("reduction") == "none"
                     else zl * lse.square().mean())
        torch.testing.assert_close(loss.double(), ref, rtol=tol_of(dtype), atol=tol_of(dtype))
        go = torch.randn(loss.shape, generator=g)
        got = torch.autograd.grad((loss * go.to(loss.dtype)).sum(), (zz, tt))
        want = torch.autograd.grad((ref * go.double()).sum(), (z64, t64))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.double(), b, rtol=tol_of(dtype), atol=tol_of(dtype))
        assert stats.accuracy is None and stats.target_logprob is None
        assert stats.counted.shape == (2, 3, 4) and bool(stats.counted.all())
        torch.testing.assert_close(stats.lse.double(), lse.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.z_loss.double(), zl * lse.detach().square(),
                                   rtol=1e-5, atol=1e-5)
        ent = torch.special.entr(torch.softmax(z.double(), 1)).sum(1)
        torch.testing.assert_close(stats.entropy.double(), ent, rtol=1e-5, atol=1e-5)


# ---- the linear head's shift=True against Hugging Face's ForCausalLMLoss


def hf_causal_lm_loss(h, w, b, labels, ignore_index=-100, num_items=None, **kw):
    """transformers.loss.loss_utils.ForCausalLMLoss in float64: pad, shift, flatten."""
    logits = h @ w.T + b
    labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1)
    reduction = "sum" if num_items is not None else kw.pop("reduction", "mean")
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels,
                           ignore_index=ignore_index, reduction=reduction, **kw)
    return loss if num_items is None else loss / num_items


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dims", [(2, 5, 4, 7), (3, 40, 16, 90), (1, 1, 4, 7)])
@pytest.mark.parametrize("kw", [{}, {"ignore_index": 3}, {"reduction": "none"},
                                {"num_items": 5}, {"label_smoothing": 0.2, "weight": True},
                                {"chunk_size": 3, "reduction": "sum"}])
def test_shift_matches_hugging_face_for_causal_lm_loss(backend, dtype, dims, kw):
    if backend == "native" and "chunk_size" in kw:
        pytest.skip("chunk_size always takes the fused path")
    kw = dict(kw)
    g = torch.Generator().manual_seed(13)
    bsz, t_len, d, c = dims
    h = torch.randn(bsz, t_len, d, generator=g).to(dtype).requires_grad_()
    w = torch.randn(c, d, generator=g).to(dtype).requires_grad_()
    b = torch.randn(c, generator=g).to(dtype).requires_grad_()
    ignore = kw.get("ignore_index", -100)
    y = torch.randint(0, c, (bsz, t_len), generator=g)
    if y.numel() > 2:
        y.view(-1)[1] = ignore
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(c, generator=g).to(dtype)
    loss, stats = xt.linear_cross_entropy(h, w, y, b, shift=True, backend=backend,
                                          statistics=ALL, **kw)
    params = [t.detach().double().requires_grad_() for t in (h, w, b)]
    kk = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()
          if k not in ("chunk_size", "ignore_index")}
    ref = hf_causal_lm_loss(*params, y, ignore, **kk)
    if kw.get("reduction") == "none":
        ref = ref.reshape(bsz, t_len)[:, :-1]
    assert loss.shape == ref.shape
    tol = tol_of(dtype)
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol, equal_nan=True)
    if loss.numel() and bool(torch.isfinite(ref).all()):
        go = torch.randn(loss.shape, generator=g)
        got = torch.autograd.grad((loss * go.to(loss.dtype)).sum(), (h, w, b))
        want = torch.autograd.grad((ref * go.double()).sum(), params)
        for a, bb in zip(got, want, strict=True):
            torch.testing.assert_close(a.double(), bb, rtol=tol, atol=5 * tol)
    # statistics: (B, T - 1), from the bf16-rounded logits where the head rounds them
    logits = F.linear(h.detach(), w.detach(), b.detach())[:, :-1]
    want_stats, counted = ref_stats(logits.movedim(-1, 1), y[:, 1:], ignore_index=ignore)
    assert stats.counted.shape == (bsz, t_len - 1)
    check(stats, {k: v for k, v in want_stats.items() if k != "accuracy" or
                  dtype != torch.bfloat16}, counted, dtype, tol=2e-2 if dtype ==
          torch.bfloat16 else 1e-4)


# ---- special rows, C = 1, ties, autograd modes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [1, 400])
def test_nan_inf_and_tied_rows_follow_torch_argmax_and_log_softmax(backend, rows):
    z = torch.tensor([[1.0, NAN, NAN, 1.0], [3.0, 3.0, INF, INF], [-INF, -INF, 0.0, 0.0],
                      [2.0, 5.0, 5.0, 5.0]])
    for y in ([1, 2, 2, 1], [2, 3, 3, 2]):
        yy = torch.tensor(y).repeat(rows)
        zz = z.repeat(rows, 1)
        _, stats = xt.cross_entropy(zz, yy, backend=backend,
                                    statistics=("lse", "target_logprob", "accuracy", "entropy"))
        want, counted = ref_stats(zz, yy)
        want.pop("z_loss")
        check(stats, want, counted, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [3, 5000])
def test_one_class(backend, rows):
    g = torch.Generator().manual_seed(14)
    z = torch.randn(rows, 1, generator=g)
    y = torch.zeros(rows, dtype=torch.long)
    y[0] = -100
    _, stats = xt.cross_entropy(z, y, backend=backend, statistics=ALL)
    check(stats, *ref_stats(z, y), torch.float32)
    assert bool((stats.entropy[1:] == 0).all()) and bool(stats.accuracy[1:].all())


def test_softcap_float64_input_keeps_float64_argmax():
    # tanh(10) and tanh(15) are both 1.0 in float32 but distinct in float64
    z = torch.tensor([[10.0, 15.0, 0.0]], dtype=torch.float64).repeat(40, 1)
    y = torch.ones(40, dtype=torch.long)
    for backend in ("auto", "rowblock"):
        _, stats = xt.cross_entropy(z, y, softcap=1.0, backend=backend,
                                    statistics=("accuracy", "lse"))
        assert bool(stats.accuracy.all()) and stats.lse.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [4, 3000])
def test_inference_mode_no_grad_and_loss_dtype(backend, rows):
    g = torch.Generator().manual_seed(15)
    z = torch.randn(rows, 50, generator=g)
    y = torch.randint(0, 50, (rows,), generator=g)
    with torch.inference_mode():
        _, stats = xt.cross_entropy(z, y, backend=backend, reduction="none", statistics=ALL)
    check(stats, *ref_stats(z, y), torch.float32)
    with torch.no_grad():
        loss, stats = xt.cross_entropy(z.clone().requires_grad_(), y, backend=backend,
                                       statistics=ALL)
    assert not loss.requires_grad
    check(stats, *ref_stats(z, y), torch.float32)
    loss, stats = xt.cross_entropy(z.bfloat16(), y, backend=backend, statistics="lse",
                                   loss_dtype=torch.float64)
    assert loss.dtype == torch.float64 and stats.lse.dtype == torch.float32


# ---- torch.compile


@pytest.mark.parametrize("compiler", ["aot_eager", "eager"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_k_dimensional_channels_last_and_shift(compiler, backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(16)

    def f(z, y):
        loss, st = xt.cross_entropy(z, y, backend=backend, statistics=ALL, reduction="none",
                                    label_smoothing=0.1)
        return loss, st.lse, st.accuracy, st.entropy, st.target_logprob, st.counted

    z = torch.randn(2, 6, 3, 4, generator=g).contiguous(memory_format=torch.channels_last)
    z[1, :, 1, 1] = 0.5  # a tied row
    y = torch.randint(0, 6, (2, 3, 4), generator=g)
    y[0, 0, 0] = -100
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    eager, compiled = f(za, y), torch.compile(f, backend=compiler, fullgraph=True)(zb, y)
    for a, b in zip(eager, compiled, strict=True):
        assert a.shape == b.shape == (2, 3, 4)
        torch.testing.assert_close(a, b, equal_nan=True)
    for t in compiled[1:]:
        assert not t.requires_grad
    ga, = torch.autograd.grad(eager[0].sum(), za)
    gb, = torch.autograd.grad(compiled[0].sum(), zb)
    torch.testing.assert_close(ga, gb)
    want, counted = ref_stats(z, y)
    assert torch.equal(compiled[2], want["accuracy"]) and torch.equal(compiled[5], counted)

    def h(x, w, t):
        loss, st = xt.linear_cross_entropy(x, w, t, shift=True, backend=backend,
                                           statistics=ALL, reduction="none")
        return loss, st.lse, st.accuracy, st.counted

    x, w = torch.randn(2, 5, 4, generator=g), torch.randn(7, 4, generator=g)
    t = torch.randint(0, 7, (2, 5), generator=g)
    t[0, 3] = -100
    compiled = torch.compile(h, backend=compiler, fullgraph=True)(x, w, t)
    for a, b in zip(h(x, w, t), compiled, strict=True):
        assert a.shape == b.shape == (2, 4)
        torch.testing.assert_close(a, b, equal_nan=True)
