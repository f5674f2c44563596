"""Review H100: migrating to crossent.torch from Liger Kernel, Cut Cross-Entropy (CCE) and
torch 2.13's ``F.linear_cross_entropy``.

Every reference here is an independent float64 transcription of the contender's documented
formula (Liger's ``liger_cross_entropy_kernel``: ``lse_square_scale * lse^2`` per counted
row, label smoothing ``eps = ls / V`` over all classes, softcap ``c tanh(z / c)`` before the
log-sum-exp, "mean" = CE sum / ``sum w[y]`` (count without weights) + z sum / count; CCE's
``linear_cross_entropy``: ``softcap(e @ c.T + bias)``, ``shift`` drops ``e[..., -1]`` and
``targets[..., 0]``, "mean" over the counted shifted targets, "none" ``(B, T - 1)`` with 0
at ignored positions), or torch's own ``F.linear_cross_entropy``; never crossent's output.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent import InputError

README = Path(__file__).resolve().parents[2] / "README.md"


def close(got, want, rtol=1e-10):
    got, want = got.detach().double(), want.detach().double()
    scale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale + 1e-300,
                               equal_nan=True)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ Liger reference
def liger_loss(z, y, ce_weight=None, ignore_index=-100, lse_square_scale=0.0,
               label_smoothing=0.0, reduction="mean", softcap=None):
    """Liger's documented row loss and reduction, in float64, differentiable."""
    v = z.shape[-1]
    zc = softcap * torch.tanh(z / softcap) if softcap is not None else z
    lse = torch.logsumexp(zc, -1)
    counted = y != ignore_index
    ys = torch.where(counted, y, 0)
    w = torch.ones(v, dtype=z.dtype) if ce_weight is None else ce_weight.to(z.dtype)
    nll = w[ys] * (lse - zc.gather(-1, ys[:, None])[:, 0])
    smooth = (label_smoothing / v) * ((lse[:, None] - zc) * w).sum(-1)
    ce = torch.where(counted, (1 - label_smoothing) * nll + smooth, 0.0)
    zl = torch.where(counted, lse_square_scale * lse * lse, 0.0)
    if reduction == "mean":
        denom_ce = w[ys][counted].sum() if ce_weight is not None else counted.sum()
        return ce.sum() / denom_ce + zl.sum() / counted.sum(), zl.sum() / counted.sum()
    if reduction == "sum":
        return (ce + zl).sum(), zl.sum()
    return ce + zl, zl


def grads(fn, *tensors, grad_output=None):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.ones_like(out) if grad_output is None else grad_output)
    return out.detach(), [t.grad for t in leaves]


LIGER_CASES = [
    dict(lse_square_scale=1e-3, reduction="mean"),
    dict(lse_square_scale=1e-3, label_smoothing=0.1, reduction="mean"),
    dict(lse_square_scale=1e-2, label_smoothing=0.2, softcap=3.0, reduction="mean",
         ignore_index=5),
    dict(lse_square_scale=1e-2, label_smoothing=0.1, softcap=3.0, reduction="sum"),
    dict(lse_square_scale=1e-2, label_smoothing=0.1, softcap=3.0, reduction="none"),
]


def _xt_kwargs(case):
    return dict(ignore_index=case.get("ignore_index", -100),
                z_loss=case.get("lse_square_scale", 0.0),
                label_smoothing=case.get("label_smoothing", 0.0),
                reduction=case["reduction"], softcap=case.get("softcap"))


def _batch(seed, n=13, v=11, ignore_index=-100, scale=3.0):
    g = gen(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.randperm(n, generator=g)[:4]] = ignore_index
    return z, y


@pytest.mark.parametrize("case", LIGER_CASES, ids=lambda c: "-".join(f"{k}={v}"
                                                                    for k, v in c.items()))
def test_liger_cross_entropy_options_match_liger_formula(case):
    # LigerCrossEntropyLoss(ignore_index, lse_square_scale, label_smoothing, reduction,
    # softcap): crossent.torch.cross_entropy(z_loss=lse_square_scale, ...) gives Liger's
    # documented loss and gradient (z-loss of the softcapped logits, unsmoothed, on counted
    # rows; "mean" divides it by the count), float64 on both sides
    z, y = _batch(1, ignore_index=case.get("ignore_index", -100))
    go = None
    if case["reduction"] == "none":
        go = torch.rand(z.shape[0], generator=gen(2), dtype=torch.float64)
    want = grads(lambda a: liger_loss(a, y, **case), z, grad_output=go)
    got = grads(lambda a: xt.cross_entropy(a, y, **_xt_kwargs(case)), z, grad_output=go)
    close(got[0], want[0])
    close(got[1][0], want[1][0])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_liger_return_z_loss_is_statistics_z_loss_reduced(reduction):
    # Liger's return_z_loss=True second output: sum of lse_square_scale*lse^2 over counted
    # rows, divided by the count under "mean"; crossent: statistics="z_loss" per token (NaN
    # on ignored rows), reduced by the caller
    z, y = _batch(3)
    _, want_z = liger_loss(z, y, lse_square_scale=1e-2, softcap=4.0, reduction=reduction)
    _, stats = xt.cross_entropy(z, y, z_loss=1e-2, softcap=4.0, reduction=reduction,
                                statistics="z_loss")
    got = stats.z_loss[stats.counted].sum()
    if reduction == "mean":
        got = got / stats.counted.sum()
    close(got, want_z)


def test_liger_class_weight_without_z_loss_matches_liger():
    # LigerCrossEntropyLoss(weight=...) / FLCE ce_weight with label smoothing and softcap:
    # crossent (torch's convention) equals Liger's weighted formula when z-loss is off
    z, y = _batch(4)
    w = torch.rand(z.shape[1], generator=gen(5), dtype=torch.float64) + 0.1
    case = dict(label_smoothing=0.1, softcap=3.0, reduction="mean")
    want = grads(lambda a: liger_loss(a, y, ce_weight=w, **case), z)
    got = grads(lambda a: xt.cross_entropy(a, y, w, **_xt_kwargs(case)), z)
    close(got[0], want[0])
    close(got[1][0], want[1][0])


def test_class_weighted_mean_z_loss_term_is_divided_by_weight_sum():
    # What crossent does (its Triton module docstring: "z-loss is not class-weighted but
    # shares that denominator"): with class weights, "mean" divides the z-term by
    # sum_n w[y_n], not by the count as Liger does; scaling every class weight by k scales
    # crossent's z-term by 1/k (the cross-entropy part is invariant)
    z, y = _batch(6)
    w = torch.rand(z.shape[1], generator=gen(7), dtype=torch.float64) + 0.1
    counted = y != -100
    ys = torch.where(counted, y, 0)
    lse = torch.logsumexp(z, -1)
    ce = F.cross_entropy(z, y, w)
    for k in (1.0, 10.0):
        want = ce + (1e-2 * lse[counted] ** 2).sum() / (k * w[ys][counted].sum())
        close(xt.cross_entropy(z, y, w * k, z_loss=1e-2), want)
        # the linear head alike (Liger's FLCE ce_weight + lse_square_scale)
        eye = torch.eye(z.shape[1], dtype=torch.float64)
        close(xt.linear_cross_entropy(z, eye, y, weight=w * k, z_loss=1e-2, chunk_size=4),
              want)


def test_liger_weighted_z_loss_mean_difference_is_documented():
    """H100-1 (fixed in the docs): crossent divides a class-weighted "mean" z-loss by
    sum w[y], Liger by the count; README's migration table and the docstring say so."""
    z, y = _batch(8)
    w = torch.rand(z.shape[1], generator=gen(9), dtype=torch.float64) + 0.1
    want, _ = liger_loss(z, y, ce_weight=w, lse_square_scale=1e-2)
    got = xt.cross_entropy(z, y, w, z_loss=1e-2)
    assert not torch.allclose(got, want, rtol=1e-10, atol=0)  # the difference is real
    row = _table_row("`\"mean\"` with class weights and a z-loss")
    assert "divided by their count" in row and "divided by `sum w[y]`" in row, row
    assert "Liger Kernel divides its z-loss by the counted rows" in " ".join(
        xt.cross_entropy.__doc__.split())


def _table_row(start: str) -> str:
    rows = [r for r in _comparison_section().splitlines() if r.startswith(f"| {start} |")]
    assert len(rows) == 1, start
    return rows[0]


def _comparison_section():
    text = README.read_text()
    start = text.index("## Which library's cross-entropy?")
    end = text.find("\n## ", start + 5)
    return text[start:end if end != -1 else None]


def test_all_ignored_mean_difference_from_liger_is_documented():
    """H100-2 (fixed in the docs): every target ignored under "mean": torch's NaN (0/0),
    where Liger returns 0; README's migration table says so."""
    z = torch.randn(4, 5, dtype=torch.float64)
    y = torch.full((4,), -100)
    got = xt.cross_entropy(z, y, z_loss=1e-3)
    assert torch.isnan(got) and torch.isnan(F.cross_entropy(z, y))
    row = _table_row("`\"mean\"` with every target ignored")
    assert "Liger: 0" in row and "NaN, as torch's" in row, row


# ------------------------------------------------------- Liger fused linear cross-entropy
def test_liger_fused_linear_all_options_match_liger_formula():
    # liger_fused_linear_cross_entropy(input, weight, target, bias, ce_weight=None,
    # ignore_index, lse_square_scale, label_smoothing, reduction, softcap): crossent's
    # linear_cross_entropy(input, W, target, bias, ignore_index=, z_loss=, label_smoothing=,
    # reduction=, softcap=), chunked (chunk_size=5), all of dx, dW, db
    g = gen(10)
    x = torch.randn(17, 6, generator=g, dtype=torch.float64)
    w = torch.randn(9, 6, generator=g, dtype=torch.float64)
    b = torch.randn(9, generator=g, dtype=torch.float64)
    y = torch.randint(0, 9, (17,), generator=g)
    y[[0, 3, 8]] = 7
    case = dict(ignore_index=7, lse_square_scale=1e-2, label_smoothing=0.1, softcap=2.5,
                reduction="sum")
    want = grads(lambda a, c, d: liger_loss(F.linear(a, c, d), y, **case), x, w, b)
    got = grads(lambda a, c, d: xt.linear_cross_entropy(a, c, y, d, chunk_size=5,
                                                        **_xt_kwargs(case)), x, w, b)
    close(got[0], want[0])
    for a, e in zip(got[1], want[1], strict=True):
        close(a, e)


# ------------------------------------------------------------------ CCE reference
def cce_loss(e, c, targets, bias=None, ignore_index=-100, softcap=None, reduction="mean",
             shift=0):
    """CCE's documented linear_cross_entropy, float64: softcap(e @ c.T + bias), shift drops
    e[..., -shift:] and targets[..., :shift], 'mean' over counted targets, 'none' shaped
    like the shifted targets with 0 where ignored."""
    if shift:
        e, targets = e[..., :-shift, :], targets[..., shift:]
    shape = targets.shape
    logits = e.reshape(-1, e.shape[-1]) @ c.T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    t = targets.reshape(-1)
    counted = t != ignore_index
    ts = torch.where(counted, t, 0)
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, ts[:, None])[:, 0]
    nll = torch.where(counted, nll, 0.0)
    if reduction == "mean":
        return nll.sum() / counted.sum()
    if reduction == "sum":
        return nll.sum()
    return nll.view(shape)


def _cce_batch(seed, b=3, t=6, d=5, v=8, ignore_index=-100):
    g = gen(seed)
    e = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    c = torch.randn(v, d, generator=g, dtype=torch.float64)
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (b, t), generator=g)
    y[0, 2] = y[1, 4] = y[2, 1] = ignore_index
    return e, c, bias, y


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cce_shift_softcap_bias_match_cce_formula(reduction):
    # cut_cross_entropy.linear_cross_entropy(e, c, targets, bias, ignore_index=3,
    # softcap=4.0, reduction, shift=True) == crossent linear_cross_entropy(e, c, targets,
    # bias, ignore_index=3, softcap=4.0, reduction, shift=True): loss and de, dc, dbias
    e, c, bias, y = _cce_batch(11, ignore_index=3)
    go = None
    if reduction == "none":
        go = torch.rand(3, 5, generator=gen(12), dtype=torch.float64)
    kw = dict(ignore_index=3, softcap=4.0, reduction=reduction)
    want = grads(lambda a, b_, d: cce_loss(a, b_, y, d, shift=1, **kw), e, c, bias,
                 grad_output=go)
    got = grads(lambda a, b_, d: xt.linear_cross_entropy(a, b_, y, d, shift=True,
                                                         chunk_size=4, **kw),
                e, c, bias, grad_output=go)
    assert got[0].shape == want[0].shape
    close(got[0], want[0])
    for a, w_ in zip(got[1], want[1], strict=True):
        close(a, w_)
    # the dropped positions: target[:, 0] never scored, hidden state e[:, -1] no gradient
    assert not got[1][0][:, -1].any()
    y2 = y.clone()
    y2[:, 0] = (y2[:, 0] + 1) % 8
    again = xt.linear_cross_entropy(e, c, y2, bias, shift=True, **kw)
    close(again, got[0])
    if reduction == "none":  # 0 at ignored shifted targets, as CCE's handle_reduction_none
        assert bool((got[0][y[:, 1:] == 3] == 0).all())


def test_cce_bfloat16_float32_loss():
    # CCE returns a float32 loss computed from the rounded (e @ c.T) ("F.cross_entropy((e @
    # c.T).float(), targets)"); crossent: loss_dtype=torch.float32
    g = gen(13)
    e = torch.randn(2, 9, 16, generator=g).bfloat16()
    c = torch.randn(40, 16, generator=g).bfloat16()
    y = torch.randint(0, 40, (2, 9), generator=g)
    got = xt.linear_cross_entropy(e, c, y, shift=True, loss_dtype=torch.float32)
    assert got.dtype == torch.float32
    logits = (e[:, :-1].reshape(-1, 16) @ c.T).double()  # bf16 rounding, as CCE's doc
    want = F.cross_entropy(logits, y[:, 1:].reshape(-1))
    close(got, want, rtol=1e-5)


def test_cce_integer_shift_raises_naming_shift():
    # CCE's shift=2 (2nd-next token); crossent's shift is a bool: an int other than 0/1
    # raises InputError naming shift (never a silent 1-token shift)
    e, c, bias, y = _cce_batch(14)
    with pytest.raises(InputError, match="shift"):
        xt.linear_cross_entropy(e, c, y, bias, shift=2)


# -------------------------------------------------- torch 2.13 F.linear_cross_entropy
def _torch_lce_cases():
    g = gen(20)
    x2 = torch.randn(10, 4, generator=g, dtype=torch.float64)
    w2 = torch.randn(7, 4, generator=g, dtype=torch.float64)
    b2 = torch.randn(7, generator=g, dtype=torch.float64)
    y2 = torch.randint(0, 7, (10,), generator=g)
    y2[[1, 6]] = 2
    cw = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    prob = torch.softmax(torch.randn(10, 7, generator=g, dtype=torch.float64), -1)
    wk = torch.randn(7, 3, 4, generator=g, dtype=torch.float64)
    bk = torch.randn(7, 3, generator=g, dtype=torch.float64)
    yk = torch.randint(0, 7, (10, 3), generator=g)
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3)
    opts_ar = torch.nn.LinearCrossEntropyOptions(chunking_method="aspect_ratio:2")
    return [
        ("plain", x2, w2, y2, {}),
        ("bias-weight-ii-ls-sum", x2, w2, y2, dict(linear_bias=b2, weight=cw,
                                                    ignore_index=2, label_smoothing=0.2,
                                                    reduction="sum")),
        ("none-ii-none", x2, w2, y2, dict(ignore_index=None, reduction="none",
                                          linear_bias=b2)),
        ("prob-weight-ls", x2, w2, prob, dict(weight=cw, label_smoothing=0.1)),
        ("1d", x2[0], w2, y2[0], dict(linear_bias=b2)),
        ("kdim", x2, wk, yk, dict(linear_bias=bk, label_smoothing=0.1)),
        ("options-chunk", x2, w2, y2, dict(linear_bias=b2, weight=cw, ignore_index=2,
                                           options=opts)),
        ("options-aspect", x2, w2, y2, dict(label_smoothing=0.3, reduction="sum",
                                            options=opts_ar)),
    ]


@pytest.mark.filterwarnings("ignore:linear_cross_entropy")
@pytest.mark.parametrize("case", _torch_lce_cases(), ids=lambda c: c[0])
def test_torch_linear_cross_entropy_every_argument(case):
    # torch 2.13's F.linear_cross_entropy(input, linear_weight, target, *, linear_bias,
    # weight, reduction, ignore_index, label_smoothing, options): crossent's with the same
    # arguments gives its loss and the input / linear_weight / linear_bias gradients
    _, x, w, y, kw = case
    kw = dict(kw)
    bias = kw.pop("linear_bias", None)
    tensors = (x, w) if bias is None else (x, w, bias)
    go = None
    if kw.get("reduction") == "none":
        go = torch.rand(y.shape, generator=gen(21), dtype=torch.float64)

    def call(fn):
        def run(*ts):
            extra = {} if len(ts) == 2 else {"linear_bias": ts[2]}
            return fn(ts[0], ts[1], y, **extra, **kw)
        return grads(run, *tensors, grad_output=go)

    want = call(F.linear_cross_entropy)
    got = call(xt.linear_cross_entropy)
    assert got[0].shape == want[0].shape
    close(got[0], want[0])
    for a, e in zip(got[1], want[1], strict=True):
        close(a, e)


@pytest.mark.filterwarnings("ignore:linear_cross_entropy")
def test_torch_linear_cross_entropy_module_parity():
    # nn.LinearCrossEntropyLoss(in, C, bias=True, weight=, ignore_index=, label_smoothing=,
    # reduction=, options=) and crossent's module: same state-dict keys, same loss and
    # parameter gradients from the same state
    cw = torch.rand(7, dtype=torch.float64) + 0.1
    kw = dict(bias=True, weight=cw, ignore_index=2, label_smoothing=0.1, reduction="sum",
              dtype=torch.float64,
              options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4))
    theirs = torch.nn.LinearCrossEntropyLoss(4, 7, **kw)
    ours = xt.LinearCrossEntropyLoss(4, 7, **kw)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    g = gen(22)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (9,), generator=g)
    y[3] = 2
    lt, lo = theirs(x, y), ours(x, y)
    lt.backward()
    lo.backward()
    close(lo, lt)
    po, pt = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for name, p in pt.items():
        close(po[name].grad, p.grad)
