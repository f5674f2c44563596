"""Differential fuzz (hypothesis) of ``crossent.torch.cross_entropy`` and
``linear_cross_entropy`` (and their modules) on CPU, on every route crossent has, against
torch in float64.

The reference is computed from the SAME inputs (low-precision values upcast exactly to
float64), written here in plain float64 torch ops (``logsumexp``, ``gather``, ``tanh``)
and differentiated by torch's autograd: torch's formula for its own options, crossent's
documented formula for ``z_loss`` (``z * lse^2`` per counted row) and ``softcap``
(``c tanh(z / c)``), and the documented differences of ``docs/guarantees.md`` (a zero
probability target on a ``-inf`` logit contributes 0 on crossent's kernels, NaN on
``backend="native"``; its target gradient is torch's ``+inf`` on the fused kernels and 0
on the composable path). The expected loss and gradients are the float64 values rounded
to the dtype crossent returns (so an fp16 overflow to inf is expected too).

Routes, each forced or steered per draw (routing thresholds patched, never the kernels):
``auto`` at the real thresholds (the direct C++ call / ``native_cross_entropy``),
``backend="native"``, the small fused kernel (``SMALL_MIN_LOGITS`` lowered),
``backend="rowblock"`` with ``block_rows`` patched to 1-4 rows (several row blocks, run by
the block workers) and the linear head with ``chunk_size`` 1-5 (several chunks), and the
composable path (``torch.func.vjp``). Which route ran is recorded and checked, so a route
cannot silently fall back to torch's kernel.

Tolerances (``_close``): the expected values are rounded to the output dtype, so ``rtol``
is three output ulps (the rounding of each side, plus the second rounding of a stored
low-precision gradient times ``grad_output``); ``atol`` is 16 ulps of the compute dtype
(float32; float64 stays) times ``1 + max|z|`` (``lse - z_y`` and ``exp(z - lse)`` lose
``|z|`` ulps in any float32 implementation), normwise over the tensor's largest
magnitude; for the linear head the logits' own rounding (bf16 matmul) is one ulp of the
matmul dtype, and ``dx``/``dW``/``db`` are scaled by the abs-products ``|G| |W|``,
``|G|^T |x|``, ``sum |G|`` (they are sums over a row that cancels).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent.torch as xt
from crossent.errors import UnsupportedError
from crossent.torch import _backends, _cross_entropy, _rowblock

F64 = torch.float64
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
INDEX_DTYPES = [torch.int64, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
SETTINGS = dict(deadline=None, derandomize=True, database=None)


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _compute(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else torch.float32


# ---------------------------------------------------------------- routes


@contextlib.contextmanager
def _route(name: str, block: int, seen: list):
    """Thresholds for route ``name``; records what ``choose_backend`` (or the direct call,
    or the small kernel) chose in ``seen`` and counts the row-block sizings."""
    small_min = 1 if name == "small" else 1 << 62  # real NATIVE_MAX_LOGITS (conftest: 0)
    real_choose, real_small = _backends.choose_backend, _cross_entropy._small.cross_entropy

    def choose(*args, **kwargs):
        out = real_choose(*args, **kwargs)
        seen.append(out)
        return out

    def small(*args, **kwargs):
        seen.append("small-direct")
        return real_small(*args, **kwargs)

    def rows(num_classes, device="cpu"):
        seen.append("blocks")
        return block

    with mock.patch.object(_backends, "NATIVE_MAX_LOGITS", 1 << 19), \
            mock.patch.object(_backends, "SMALL_MIN_LOGITS", small_min), \
            mock.patch.object(_backends, "choose_backend", choose), \
            mock.patch.object(_cross_entropy._small, "cross_entropy", small), \
            mock.patch.object(_rowblock, "block_rows", rows), \
            mock.patch.object(_cross_entropy, "block_rows", rows):
        yield


def _strided(t, on: bool):
    """``t`` as a non-contiguous view (every other row of a twice-as-long tensor), a
    differentiable function of ``t``; ``t`` itself when ``on`` is False or it is 0-d."""
    if t is None or not on or t.dim() == 0:
        return t
    return torch.stack([t, torch.zeros_like(t)], 1).flatten(0, 1)[::2]


# ---------------------------------------------------------------- comparison


def _scale(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)]
    return float(finite.abs().max()) if finite.numel() else 1.0


def _close(what, got, want, *, out_dtype, eps, zmax, scale=None, unit=0.0, route=""):
    """``got`` (crossent, any dtype) against the float64 ``want`` rounded to ``out_dtype``;
    ``unit``: the size of the terms that cancel in ``want`` (a gradient ``r (p - t)`` that
    is exactly 0 still carries float32 rounding of ``r p`` and ``r t``)."""
    assert got is not None, f"{route}: {what} is None"
    assert got.dtype == out_dtype, f"{route}: {what} dtype {got.dtype}, torch's {out_dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{route}: {what} shape"
    want = want.detach().to(out_dtype).to(F64)
    scale = max(_scale(want) if scale is None else scale, unit)
    rtol = 3 * _eps(out_dtype)
    atol = 16 * eps * (1.0 + zmax) * max(scale, 1e-300)
    torch.testing.assert_close(got.detach().to(F64), want, rtol=rtol, atol=atol,
                               equal_nan=True, msg=lambda m: f"{route}: {what}: {m}")


# ---------------------------------------------------------------- the reference


def _reference(z, t, w, *, ignore_index, reduction, ls, zl, cap, num_items, zero_term):
    """float64 loss of ``(M, C)`` logits ``z``. ``zero_term``: a zero probability target
    on a ``-inf`` logit contributes 0 (crossent's kernels); else torch's ``0 x -inf``."""
    num_rows, num_classes = z.shape
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    lse = torch.logsumexp(z, 1)
    logp = z - lse.unsqueeze(1)
    if t.is_floating_point():
        big = (1 - ls) * t + ls / num_classes if ls else t
        big = big if w is None else big * w
        if zero_term:  # the term is 0 for every target and weight value there
            logp = torch.where((big == 0) & torch.isneginf(logp), 0.0, logp)
        term = big * logp
        rows = -term.sum(1) + zl * lse.square()
        den = torch.tensor(float(num_rows), dtype=F64)
        nan_at_zero = False
    else:
        valid = t != ignore_index
        idx = torch.where(valid, t, 0)
        wc = torch.ones(num_classes, dtype=F64) if w is None else w
        w_y = torch.where(valid, wc[idx], 0.0)
        nll = -logp.gather(1, idx.unsqueeze(1)).squeeze(1)
        rows = (1 - ls) * w_y * nll if ls else w_y * nll
        if ls:
            rows = rows + (ls / num_classes) * -(logp @ wc)
        rows = torch.where(valid, rows + zl * lse.square(), 0.0)
        den = w_y.sum()
        nan_at_zero = ls > 0  # torch's 0/0 of the unsmoothed part (docs/guarantees.md)
    if reduction == "none":
        return rows
    total = rows.sum()
    if num_items is not None:
        return total / float(num_items)
    if reduction == "sum":
        return total
    out = total / den
    return out + math.nan if nan_at_zero and float(den) == 0 else out


# ---------------------------------------------------------------- cross_entropy cases

# what both losses draw: targets, class weights, the options, the reduction, the count
OPTION_STRATEGIES = {
    "index_dtype": st.sampled_from(INDEX_DTYPES),
    # "wrapped": a class id + 256, which a uint8/int8 comparison would wrap onto the class
    "ignore": st.sampled_from(["default", "class", "absent", "wrapped"]),
    "ignored": st.sampled_from([0.0, 0.3, 1.0]),
    "weight": st.sampled_from([None, "positive", "zeros", "signed"]),
    "weight_dtype": st.sampled_from(["same", "same", torch.float32, torch.float64]),
    "target_grad": st.booleans(),
    "weight_grad": st.booleans(),
    "ls": st.sampled_from([0.0, 0.0, 0.1, 0.6, 1.0]),
    "zl": st.sampled_from([0.0, 0.0, 1e-3, 0.5]),
    "cap": st.sampled_from([None, None, 5.0, 0.7]),
    "reduction": st.sampled_from(["mean", "sum", "none"]),
    "num_items": st.sampled_from([None, None, 3, 2.5, "tensor"]),
    "loss_dtype": st.sampled_from([None, None, torch.float32, torch.float64]),
    "grad_out": st.sampled_from([1.0, 1.0, 0.5, -2.0, 0.0]),
}

ce_cases = st.fixed_dictionaries({
    **OPTION_STRATEGIES,
    "seed": st.integers(0, 2**31 - 1),
    "dtype": st.sampled_from(DTYPES),
    "kind": st.sampled_from(["2d", "2d", "2d", "kdim", "unbatched"]),
    "n": st.sampled_from([0, 1, 2, 3, 5, 7, 12]),
    "d1": st.integers(1, 3),
    "c": st.sampled_from([1, 2, 3, 5, 8, 11]),
    "prob": st.booleans(),
    "prob_dtype": st.sampled_from(["same", torch.float32, torch.float64]),
    "layout": st.sampled_from(["contig", "transposed", "sliced"]),
    # -inf logits on some non-target classes (or on the target class too: an infinite
    # loss), logits of 1e4
    "special": st.sampled_from(["none", "none", "neg_inf", "neg_inf_target", "large"]),
    "inplace": st.booleans(),
    "block": st.integers(1, 4),
    "module": st.booleans(),
    "plain": st.booleans(),  # torch's options only (the direct call, the small kernel)
    "views": st.booleans(),  # target and class weight as non-contiguous views
})


def _index_targets(case, index, m, c, g, opts):
    """Class-index targets from ``index``: some rows ignored (``case["ignore"]``: the
    default -100, an in-range class, a value no row has, a class + 256 that a uint8/int8
    comparison would wrap onto a real class), in ``case["index_dtype"]``; ``opts`` gets
    the ``ignore_index`` unless it is the default. Returns ``(targets, ignore_index)``."""
    ignore_index = -100
    idt = case["index_dtype"]
    t = index.clone()
    drop = torch.rand(m, generator=g) < case["ignored"]
    if case["ignore"] == "class":
        ignore_index = int(torch.randint(0, c, (), generator=g))
        t[drop] = ignore_index
    elif case["ignore"] == "absent":
        ignore_index = -7 if idt != torch.uint8 else 200
    elif case["ignore"] == "wrapped":
        ignore_index = int(index[0]) + 256 if m else 256
    elif idt != torch.uint8:  # -100 is no uint8 value: nothing ignored there
        t[drop] = -100
    if case["ignore"] != "default":
        opts["ignore_index"] = ignore_index
    return t.to(idt), ignore_index


def _class_weight(case, c, g, dtype, prob):
    """``case["weight"]``: None, positive, signed (torch takes negative class weights) or
    with zeros; in the logits' dtype, or (probability targets: torch multiplies and
    promotes, so any floating weight) in ``case["weight_dtype"]``."""
    if case["weight"] is None:
        return None
    w = torch.rand(c, generator=g, dtype=F64) + 0.25
    if case["weight"] == "signed":
        w = w * torch.randint(0, 2, (c,), generator=g).mul(2).sub(1)
    if case["weight"] == "zeros":
        w[torch.rand(c, generator=g) < 0.5] = 0.0
    same = not prob or case["weight_dtype"] == "same"
    return w.to(dtype if same else case["weight_dtype"])

def _ce_data(case):
    """Tensors of one case: the leaf the logits are a view of (and its layout), target,
    class weight, the flattening to (M, C) rows, the grad_output and the options."""
    g = torch.Generator().manual_seed(case["seed"])
    if case["plain"]:
        case.update(weight=None, ls=0.0, zl=0.0, cap=None, prob=False)
    dtype, c, kind = case["dtype"], case["c"], case["kind"]
    n = 1 if kind == "unbatched" else case["n"]
    d1 = case["d1"] if kind == "kdim" else 1
    m = n * d1
    scale = 1e4 if case["special"] == "large" else 3.0
    base = torch.randn(m, c, generator=g, dtype=F64) * scale  # rows (M, C)
    prob = case["prob"]
    index = torch.randint(0, c, (m,), generator=g)
    if case["special"].startswith("neg_inf"):  # masked classes; one class stays finite
        keep = index if case["special"] == "neg_inf" and not prob else \
            torch.randint(0, c, (m,), generator=g)
        mask = (torch.rand(m, c, generator=g) < 0.4)
        mask[torch.arange(m), keep] = False
        base[mask] = -math.inf
    else:
        mask = torch.zeros(m, c, dtype=torch.bool)
    opts = {"reduction": case["reduction"], "label_smoothing": case["ls"],
            "z_loss": case["zl"], "softcap": case["cap"], "loss_dtype": case["loss_dtype"]}
    ignore_index = -100
    if prob:
        tdtype = dtype if case["prob_dtype"] == "same" else case["prob_dtype"]
        t = torch.rand(m, c, generator=g, dtype=F64)
        t[torch.rand(m, c, generator=g) < 0.3] = 0.0
        t[mask] = 0.0
        t = (t / t.sum(1, keepdim=True).clamp_min(1e-3)).to(tdtype)
    else:
        t, ignore_index = _index_targets(case, index, m, c, g, opts)
    prob = case["prob"]
    w = _class_weight(case, c, g, dtype, prob)
    # the caller's layout: rows (M, C) -> (N, C) / (N, C, d1) / (C,), a view of a leaf
    layout = case["layout"] if kind == "2d" else "contig"
    if layout == "transposed":
        leaf = base.t().contiguous().to(dtype)  # (C, N) storage

        def view(x):
            return x.t()
    elif layout == "sliced":
        leaf = torch.zeros(m, 2 * c, dtype=F64)
        leaf[:, ::2] = base
        leaf = leaf.to(dtype)

        def view(x):
            return x[:, ::2]
    elif kind == "kdim":
        leaf = base.to(dtype)  # (N * d1, C) rows: (N, d1, C) storage, (N, C, d1) view

        def view(x):
            return x.reshape(n, d1, c).movedim(2, 1)
    elif kind == "unbatched":
        leaf = base[0].to(dtype)

        def view(x):
            return x
    else:
        leaf = base.to(dtype)

        def view(x):
            return x
    if kind == "kdim":
        target = (t.reshape(n, d1, c).movedim(2, 1) if prob else t.reshape(n, d1))
    elif kind == "unbatched":
        target = t[0]
    else:
        target = t
    row_shape = () if kind == "unbatched" else ((n, d1) if kind == "kdim" else (n,))
    if case["reduction"] == "none":
        go = torch.randn(row_shape, generator=g, dtype=F64)
    else:
        go = torch.tensor(case["grad_out"], dtype=F64)
    if case["num_items"] is not None and case["reduction"] != "none":
        count = case["num_items"]
        opts["num_items"] = torch.tensor(4.0) if count == "tensor" else count
    return leaf, view, target, w, ignore_index, go, opts, mask


def _rows_of(view_out: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, C) / (N, C, d1) / (C,) -> (M, C), as torch flattens."""
    if kind == "unbatched":
        return view_out.unsqueeze(0)
    if kind == "kdim":
        return view_out.movedim(1, -1).reshape(-1, view_out.shape[1])
    return view_out


def _expected_loss_dtype(dtype, target, weight, loss_dtype):
    if loss_dtype is not None:
        return loss_dtype
    out = dtype
    if target.is_floating_point():
        out = torch.promote_types(out, target.dtype)
        if weight is not None:
            out = torch.promote_types(out, weight.dtype)
    return out


def _ce_reference(case, leaf, view, target, w, ignore_index, go, opts, *, zero_term,
                  need_t, need_w):
    """Float64 loss and gradients (leaf, target, weight) of the case."""
    leaf64 = leaf.detach().to(F64).requires_grad_()
    t64 = target.detach()
    t64 = t64.to(F64).requires_grad_(need_t) if t64.is_floating_point() else t64.long()
    w64 = None if w is None else w.detach().to(F64).requires_grad_(need_w)
    z = _rows_of(view(leaf64), case["kind"])
    t_rows = (_rows_of(t64, case["kind"]) if t64.is_floating_point()
              else t64.reshape(-1))
    loss = _reference(z, t_rows, w64, ignore_index=ignore_index,
                      reduction=case["reduction"], ls=case["ls"], zl=case["zl"],
                      cap=case["cap"], num_items=opts.get("num_items"), zero_term=zero_term)
    if not case["zl"] and case["cap"] is None and not zero_term:
        # the reference written out is torch's own float64 cross_entropy where torch
        # has the options
        count = opts.get("num_items")
        with torch.no_grad():
            torchs = torch.nn.functional.cross_entropy(
                z, t_rows, w64, ignore_index=ignore_index, label_smoothing=case["ls"],
                reduction="sum" if count is not None else case["reduction"])
        torchs = torchs / float(count) if count is not None else torchs
        torch.testing.assert_close(loss.detach(), torchs, rtol=1e-10, equal_nan=True,
                                   atol=1e-12 * _scale(torchs))
    if case["reduction"] == "none":
        loss = loss.reshape(go.shape)
    inputs = [leaf64] + ([t64] if need_t else []) + ([w64] if need_w else [])
    grads = torch.autograd.grad(loss, inputs, go, allow_unused=True)
    return loss.detach(), grads


def _call_ce(case, route, leaf, view, target, w, opts, go, seen):
    """crossent's loss and gradients (leaf, target, weight) on ``route``."""
    need_t = target.is_floating_point() and case["target_grad"]
    need_w = w is not None and case["weight_grad"]
    backend = {"native": "native", "rowblock": "rowblock"}.get(route, "auto")
    kwargs = dict(opts)
    inplace = case["inplace"] and route != "composite"
    leaf = leaf.detach().clone().requires_grad_()
    t = target.detach().clone().requires_grad_(need_t)
    wt = None if w is None else w.detach().clone().requires_grad_(need_w)

    def loss_of(leaf_, t_, w_):
        z = view(leaf_ * 1 if inplace else leaf_)  # an activation's memory for in place
        t_, w_ = _strided(t_, case["views"]), _strided(w_, case["views"])
        if case["module"] and route == "rowblock":
            module = xt.CrossEntropyLoss(
                w_, ignore_index=kwargs.get("ignore_index", -100),
                reduction=kwargs["reduction"], label_smoothing=kwargs["label_smoothing"],
                z_loss=kwargs["z_loss"], softcap=kwargs["softcap"], inplace_backward=inplace,
                loss_dtype=kwargs["loss_dtype"], backend=backend)
            return module(z, t_, num_items=kwargs.get("num_items"))
        return xt.cross_entropy(z, t_, w_, inplace_backward=inplace, backend=backend,
                                **kwargs)

    with _route(route, case["block"], seen):
        if route == "composite":
            primals = [leaf] + ([t] if need_t else []) + ([wt] if need_w else [])

            def fn(*args):
                it = iter(args[1:])
                return loss_of(args[0], next(it) if need_t else t, next(it) if need_w else wt)
            loss, vjp = torch.func.vjp(fn, *primals)
            grads = vjp(go.to(loss.dtype))
            return loss, list(grads) + [None] * (3 - len(grads))
        loss = loss_of(leaf, t, wt)
        inputs = [leaf] + ([t] if need_t else []) + ([wt] if need_w else [])
        grads = torch.autograd.grad(loss, inputs, go.to(loss.dtype), allow_unused=True)
    return loss, list(grads) + [None] * (3 - len(grads))


def _unit(case, leaf, target, w, go, opts, ignore_index, zmax):
    """The magnitude of the terms that cancel in this case's values: for the loss, the
    reduction's row scale (``1 / num_items``, ``1 / denominator``) times the rows it sums
    times the largest class weight (and z-loss's ``z lse``); for a gradient entry,
    ``|grad_output|`` times the row scale times the largest target mass (``2 z lse``)."""
    c = leaf.shape[-1] if case["kind"] == "unbatched" else (
        leaf.shape[0] if case["layout"] == "transposed" else leaf.shape[1] // (
            2 if case["layout"] == "sliced" else 1))
    wmax = 1.0 if w is None else max(1.0, float(w.to(F64).abs().max()))
    if target.is_floating_point():
        num_rows = target.numel() // max(c, 1)
        den = float(num_rows)
    else:
        t = target.reshape(-1).long()
        num_rows = t.numel()
        valid = t != ignore_index
        wy = torch.ones(t.shape, dtype=F64) if w is None else w.to(F64)[t.clamp(0, c - 1)]
        den = float(torch.where(valid, wy, 0.0).sum())
    if opts.get("num_items") is not None:
        row = 1.0 / float(opts["num_items"])
    elif case["reduction"] == "mean" and den != 0:
        row = 1.0 / abs(den)
    else:
        row = 1.0
    lse = zmax + math.log(max(c, 1))
    rows = 1 if case["reduction"] == "none" else max(num_rows, 1)
    loss_unit = row * rows * wmax * (1.0 + case["zl"] * lse)
    go_max = float(go.abs().max()) if go.numel() else 0.0
    return loss_unit, go_max * row * wmax * (1.0 + 2 * case["zl"] * lse)


_ALLOWED = {  # what choose_backend may return (or the direct call) on each route
    "auto": {"native", "rowblock", "composite"},
    "native": {"native"},
    "small": {"small", "small-direct"},
    "rowblock": {"rowblock", "composite"},
    "composite": {"composite"},
}


def _check_ce_case(case):
    case = dict(case)
    leaf, view, target, w, ignore_index, go, opts, mask = _ce_data(case)
    prob = target.is_floating_point()
    if not prob and w is not None and case["weight_grad"]:
        # torch: nll_loss is not differentiable with respect to weight; crossent refuses
        for backend in ("auto", "native", "rowblock"):
            with pytest.raises(UnsupportedError, match="weight"):
                xt.cross_entropy(view(leaf.detach()).requires_grad_(), target,
                                 w.detach().requires_grad_(), backend=backend, **opts)
        case = {**case, "weight_grad": False}
    need_t = prob and case["target_grad"]
    need_w = w is not None and case["weight_grad"]
    neg_inf_prob = prob and bool(mask.any())
    refs = {}

    def reference(zero_term):
        if zero_term not in refs:
            refs[zero_term] = _ce_reference(case, leaf, view, target, w, ignore_index, go,
                                            opts, zero_term=zero_term, need_t=need_t,
                                            need_w=need_w)
        return refs[zero_term]

    small_fits = (not prob and case["dtype"] in (torch.float32, F64) and w is None
                  and not case["ls"] and not case["zl"] and case["cap"] is None
                  and leaf.numel() > 0)
    routes = ["auto", "native", "rowblock", "composite"] + (["small"] if small_fits else [])
    out_dtype = _expected_loss_dtype(case["dtype"], target, w, case["loss_dtype"])
    go = go.to(out_dtype).to(F64)  # grad_output as the loss's dtype holds it
    # the logits' magnitude (softcap maps -inf to -cap)
    zmax = _scale(leaf.detach().to(F64)) + (case["cap"] or 0.0)
    loss_unit, unit = _unit(case, leaf, target, w, go, opts, ignore_index, zmax)
    results = {}
    for route in routes:
        seen: list = []
        if route == "native" and (case["zl"] or case["cap"] is not None):
            with pytest.raises(UnsupportedError, match="native"):
                _call_ce(case, route, leaf, view, target, w, opts, go, seen)
            continue
        loss, grads = _call_ce(case, route, leaf, view, target, w, opts, go, seen)
        chosen = [s for s in seen if s != "blocks"]
        assert set(chosen or ["direct"]) <= _ALLOWED[route] | {"direct"}, (route, seen)
        if route in ("rowblock", "small") or route == "composite":
            assert chosen, (route, seen)  # never the direct torch call
        if route == "rowblock" and "rowblock" in chosen and leaf.numel():
            assert "blocks" in seen  # the patched row blocks were used
        # which formula (docs/guarantees.md): torch's 0 x -inf on torch's kernel; a zero
        # probability target on a -inf logit contributes 0 on crossent's, whose target
        # gradient there is torch's +inf on the fused kernels, 0 on the composable path
        torch_kernel = "native" in chosen or (not chosen and route in ("auto", "native"))
        composite = "composite" in chosen
        ref_loss, ref_grads = reference(zero_term=not torch_kernel)
        ctx = dict(route=f"{route} {chosen}", zmax=zmax, unit=unit)
        eps_c = _eps(_compute(case["dtype"]))
        _close("loss", loss, ref_loss, out_dtype=out_dtype, eps=eps_c,
               **{**ctx, "unit": loss_unit})
        _close("d/dlogits", grads[0], ref_grads[0], out_dtype=case["dtype"], eps=eps_c, **ctx)
        k = 1
        if need_t:
            dt_ref = reference(zero_term=composite)[1][k]
            _close("d/dtarget", grads[1], dt_ref, out_dtype=target.dtype, eps=eps_c, **ctx)
            k += 1
        if need_w:
            _close("d/dweight", grads[2] if need_t else grads[1], ref_grads[k],
                   out_dtype=w.dtype, eps=eps_c, **ctx)
        results[route] = (loss, grads[0], torch_kernel)
    # property: every route gives the same loss and logits gradient (same formula)
    same = [(r, v) for r, v in results.items() if not (neg_inf_prob and v[2])]
    for (r1, (l1, g1, _)), (r2, (l2, g2, _)) in itertools.pairwise(same):
        eps_c = _eps(_compute(case["dtype"]))
        for what, a, b, u in (("loss", l1, l2, loss_unit), ("d/dlogits", g1, g2, unit)):
            scale = max(_scale(a.detach().to(F64)), u)
            torch.testing.assert_close(
                b.detach().to(F64), a.detach().to(F64), equal_nan=True,
                rtol=6 * _eps(a.dtype), atol=32 * eps_c * (1 + zmax) * scale,
                msg=lambda m, what=what, r1=r1, r2=r2: f"{r1} vs {r2}: {what}: {m}")


@settings(max_examples=100, **SETTINGS)
@given(case=ce_cases)
def test_cross_entropy_every_route_matches_float64_torch(case):
    _check_ce_case(case)


# ---------------------------------------------------------------- linear_cross_entropy

linear_cases = st.fixed_dictionaries({
    **OPTION_STRATEGIES,
    "seed": st.integers(0, 2**31 - 1),
    "dtype": st.sampled_from(DTYPES),
    "n": st.sampled_from([0, 1, 2, 3, 5, 9, None]),  # None: unbatched (D,) input
    "d": st.sampled_from([1, 3, 4]),
    "c": st.sampled_from([1, 2, 3, 5, 8]),
    "bias": st.booleans(),
    "prob": st.booleans(),
    "x_layout": st.sampled_from(["contig", "transposed", "sliced"]),
    "w_layout": st.sampled_from(["contig", "transposed"]),
    "special": st.sampled_from(["none", "none", "neg_inf_bias", "large"]),
    "chunk": st.integers(1, 5),
    "block": st.integers(1, 3),
    "module": st.booleans(),
    "plain": st.booleans(),
    "views": st.booleans(),  # target, class weight and bias as non-contiguous views
})


def _stored(base: torch.Tensor, layout: str, dtype: torch.dtype):
    """A leaf in ``dtype`` holding ``base`` and the view that gives ``base``'s layout back
    (transposed storage, every other column, or the leaf itself)."""
    if layout == "transposed" and base.dim() == 2:
        return base.t().contiguous().to(dtype), (lambda s: s.t())
    if layout == "sliced" and base.dim() == 2:
        leaf = torch.zeros(base.shape[0], 2 * base.shape[1], dtype=F64)
        leaf[:, ::2] = base
        return leaf.to(dtype), (lambda s: s[:, ::2])
    return base.to(dtype), (lambda s: s)


def _linear_data(case):
    g = torch.Generator().manual_seed(case["seed"])
    if case["plain"]:
        case.update(weight=None, ls=0.0, zl=0.0, cap=None, prob=False)
    dtype, c, d, n = case["dtype"], case["c"], case["d"], case["n"]
    m = 1 if n is None else n
    scale = 30.0 if case["special"] == "large" else 1.0
    x = torch.randn(m, d, generator=g, dtype=F64)
    wt = torch.randn(c, d, generator=g, dtype=F64) * scale
    b = torch.randn(c, generator=g, dtype=F64) if case["bias"] else None
    index = torch.randint(0, c, (m,), generator=g)
    masked = torch.zeros(c, dtype=torch.bool)
    if case["special"] == "neg_inf_bias" and b is not None:  # classes no row targets
        masked = torch.rand(c, generator=g) < 0.5
        masked[index] = False
        b[masked] = -math.inf
    opts = {"reduction": case["reduction"], "label_smoothing": case["ls"],
            "z_loss": case["zl"], "softcap": case["cap"], "loss_dtype": case["loss_dtype"]}
    ignore_index = -100
    if case["prob"]:
        t = torch.rand(m, c, generator=g, dtype=F64)
        t[torch.rand(m, c, generator=g) < 0.3] = 0.0
        t[:, masked] = 0.0
        t = (t / t.sum(1, keepdim=True).clamp_min(1e-3)).to(dtype)
    else:
        t, ignore_index = _index_targets(case, index, m, c, g, opts)
    prob = case["prob"]
    w = _class_weight(case, c, g, dtype, prob)
    if n is None:
        x, t = x[0], t[0]
    xs = _stored(x, case["x_layout"], dtype)
    ws = _stored(wt, case["w_layout"], dtype)
    bs = None if b is None else (b.to(dtype), lambda s: s)
    row_shape = () if n is None else (m,)
    go = (torch.randn(row_shape, generator=g, dtype=F64) if case["reduction"] == "none"
          else torch.tensor(case["grad_out"], dtype=F64))
    if case["num_items"] is not None and case["reduction"] != "none":
        opts["num_items"] = torch.tensor(4.0) if case["num_items"] == "tensor" \
            else case["num_items"]
    return xs, ws, bs, t, w, ignore_index, go, opts


def _linear_reference(case, xs, ws, bs, t, w, ignore_index, go, opts, *, torch_logits,
                      need_t, need_w, zero_term):
    """float64 loss, ``G = dL/dlogits`` and the gradients of x, W, b (logical shapes),
    target and class weight. ``torch_logits``: the logits' values are torch's unfused
    ``F.linear`` in the input dtype (bf16 and fp16 on every route: crossent's CPU head
    multiplies fp16 in float32 and rounds the logits to fp16, docs/guarantees.md); their
    gradient flows through the exact float64 product."""
    x64 = xs[1](xs[0]).detach().to(F64).requires_grad_()
    w64 = ws[1](ws[0]).detach().to(F64).requires_grad_()
    b64 = None if bs is None else bs[0].detach().to(F64).requires_grad_()
    t64 = t.detach().to(F64).requires_grad_(need_t) if t.is_floating_point() else t.long()
    cw64 = None if w is None else w.detach().to(F64).requires_grad_(need_w)
    x2 = x64.unsqueeze(0) if x64.dim() == 1 else x64
    z = torch.nn.functional.linear(x2, w64, b64)
    if torch_logits:
        low = torch.nn.functional.linear(
            xs[1](xs[0]).detach().reshape(x2.shape), ws[1](ws[0]).detach(),
            None if bs is None else bs[0].detach()).to(F64)
        step = (low - z).detach()  # (-inf - -inf: the same -inf logit, no step)
        z = z + torch.where(torch.isfinite(step), step, 0.0)
    t2 = t64.reshape(z.shape) if t64.is_floating_point() else t64.reshape(-1)
    loss = _reference(z, t2, cw64, ignore_index=ignore_index, reduction=case["reduction"],
                      ls=case["ls"], zl=case["zl"], cap=case["cap"],
                      num_items=opts.get("num_items"), zero_term=zero_term)
    loss = loss.reshape(go.shape) if case["reduction"] == "none" else loss
    inputs = [z, x64, w64] + ([b64] if b64 is not None else []) + \
        ([t64] if need_t else []) + ([cw64] if need_w else [])
    grads = list(torch.autograd.grad(loss, inputs, go, allow_unused=True))
    return loss.detach(), z.detach(), grads


def _call_linear(case, route, xs, ws, bs, t, w, opts, go, seen):
    need_t = t.is_floating_point() and case["target_grad"]
    need_w = w is not None and case["weight_grad"]
    backend = {"native": "native", "rowblock": "rowblock"}.get(route, "auto")
    kwargs = dict(opts)
    if route == "rowblock":
        kwargs["chunk_size"] = case["chunk"]
    xl = xs[0].detach().clone().requires_grad_()
    wl = ws[0].detach().clone().requires_grad_()
    bl = None if bs is None else bs[0].detach().clone().requires_grad_()
    tl = t.detach().clone().requires_grad_(need_t)
    cw = None if w is None else w.detach().clone().requires_grad_(need_w)
    module = None
    if case["module"] and route == "rowblock":
        c, d = ws[1](wl).shape
        module = xt.LinearCrossEntropyLoss(
            d, c, bias=bl is not None, dtype=case["dtype"], reduction=kwargs["reduction"],
            weight=cw, ignore_index=kwargs.get("ignore_index"),
            label_smoothing=kwargs["label_smoothing"], z_loss=kwargs["z_loss"],
            softcap=kwargs["softcap"], chunk_size=kwargs["chunk_size"],
            loss_dtype=kwargs["loss_dtype"], backend=backend)
        with torch.no_grad():
            module.linear.weight.copy_(ws[1](wl))
            if bl is not None:
                module.linear.bias.copy_(bl)

    def loss_of(x_, w_, b_, t_, cw_):
        t_, cw_, b_ = (_strided(v, case["views"]) for v in (t_, cw_, b_))
        if module is not None:
            return module(xs[1](x_), t_, num_items=kwargs.get("num_items"))
        return xt.linear_cross_entropy(xs[1](x_), ws[1](w_), t_, b_, weight=cw_,
                                       backend=backend, **kwargs)

    primals = [xl, wl] + ([bl] if bl is not None else []) + ([tl] if need_t else []) + \
        ([cw] if need_w else [])
    with _route(route, case["block"], seen):
        if route == "composite":
            def fn(*args):
                it = iter(args[2:])
                b_ = next(it) if bl is not None else None
                t_ = next(it) if need_t else tl
                return loss_of(args[0], args[1], b_, t_, next(it) if need_w else cw)
            loss, vjp = torch.func.vjp(fn, *primals)
            grads = list(vjp(go.to(loss.dtype)))
        else:
            loss = loss_of(*primals[:2], bl, tl, cw)
            if module is not None:
                params = [module.linear.weight] + ([module.linear.bias] if bl is not None
                                                   else [])
                primals = [xl, *params, *primals[2 + (bl is not None):]]
            grads = list(torch.autograd.grad(loss, primals, go.to(loss.dtype),
                                             allow_unused=True))
    # logical shapes: x and W through their views (the module's W is stored plainly)
    grads[0] = None if grads[0] is None else xs[1](grads[0])
    if module is None and grads[1] is not None:
        grads[1] = ws[1](grads[1])
    if bl is None:
        grads.insert(2, None)
    grads += [None] * (5 - len(grads))
    if need_w and not need_t:
        grads[3], grads[4] = None, grads[3]
    return loss, grads


def _check_linear_case(case):
    case = dict(case)
    xs, ws, bs, t, w, ignore_index, go, opts = _linear_data(case)
    prob = t.is_floating_point()
    dtype = case["dtype"]
    if not prob and w is not None and case["weight_grad"]:
        for backend in ("auto", "native", "rowblock"):
            with pytest.raises(UnsupportedError, match="weight"):
                xt.linear_cross_entropy(xs[1](xs[0]), ws[1](ws[0]).requires_grad_(), t,
                                        weight=w.detach().requires_grad_(), backend=backend,
                                        **opts)
        case["weight_grad"] = False
    need_t = prob and case["target_grad"]
    need_w = w is not None and case["weight_grad"]
    out_dtype = _expected_loss_dtype(dtype, t, w, case["loss_dtype"])
    go = go.to(out_dtype).to(F64)
    eps_c = _eps(_compute(dtype))
    refs = {}
    results = {}
    for route in ("auto", "native", "rowblock", "composite"):
        seen: list = []
        if route == "native" and (case["zl"] or case["cap"] is not None):
            with pytest.raises(UnsupportedError, match="native"):
                _call_linear(case, route, xs, ws, bs, t, w, opts, go, seen)
            continue
        loss, grads = _call_linear(case, route, xs, ws, bs, t, w, opts, go, seen)
        chosen = [s for s in seen if s != "blocks"]
        assert chosen and set(chosen) <= _ALLOWED[route] | {"native", "rowblock"}, seen
        torch_kernel = chosen[0] == "native"
        composite = chosen[0] == "composite"
        if route == "rowblock":
            assert chosen[0] in ("rowblock", "composite"), seen
        # float16 on CPU: multiplied in float32, rounded to float16 as torch's F.linear
        torch_logits = dtype in (torch.bfloat16, torch.float16)
        key = (torch_logits, not torch_kernel)
        if key not in refs:
            refs[key] = _linear_reference(case, xs, ws, bs, t, w, ignore_index, go, opts,
                                          torch_logits=torch_logits, need_t=need_t,
                                          need_w=need_w, zero_term=not torch_kernel)
        ref_loss, z, ref = refs[key]
        zmax = _scale(z) + (case["cap"] or 0.0)
        eps = eps_c + (_eps(dtype) / 8 if torch_logits else 0.0)  # one ulp of a logit
        shape = {"kind": "2d", "layout": "contig", "reduction": case["reduction"],
                 "zl": case["zl"]}
        loss_unit, unit = _unit(shape, z, t if t.dim() else t.reshape(1), w, go, opts,
                                ignore_index, zmax)
        ctx = dict(route=f"linear {route} {chosen}", zmax=zmax, eps=eps)
        gabs = ref[0].abs()
        x2 = ref[1].reshape(-1, ref[2].shape[1]).detach()
        xv = xs[1](xs[0]).detach().to(F64).reshape(x2.shape)
        wv = ws[1](ws[0]).detach().to(F64)
        _close("loss", loss, ref_loss, out_dtype=out_dtype, unit=loss_unit, **ctx)
        _close("dx", grads[0], ref[1], out_dtype=dtype,
               scale=max(_scale(gabs @ wv.abs()), unit), **ctx)
        _close("dW", grads[1], ref[2], out_dtype=dtype,
               scale=max(_scale(gabs.t() @ xv.abs()), unit), **ctx)
        k = 3
        if bs is not None:
            _close("db", grads[2], ref[3], out_dtype=dtype,
                   scale=max(_scale(gabs.sum(0)), unit), **ctx)
            k = 4
        if need_t:
            dt_ref = ref[k] if composite else refs.setdefault(
                (torch_logits, False),
                _linear_reference(case, xs, ws, bs, t, w, ignore_index, go, opts,
                                  torch_logits=torch_logits, need_t=need_t,
                                  need_w=need_w, zero_term=False))[2][k]
            _close("d/dtarget", grads[3], dt_ref, out_dtype=t.dtype, unit=unit, **ctx)
            k += 1
        if need_w:
            _close("d/dweight", grads[4], ref[k], out_dtype=w.dtype, unit=unit, **ctx)
        if not torch_kernel:
            results[route] = loss
    # property: crossent's routes give the same loss (torch's kernel, where it differs by
    # its fp16 logits' rounding or 0 x -inf, was held to its own reference above)
    fused = list(results.items())
    for (r1, l1), (r2, l2) in itertools.pairwise(fused):
        torch.testing.assert_close(l2.detach().to(F64), l1.detach().to(F64), equal_nan=True,
                                   rtol=6 * _eps(l1.dtype),
                                   atol=64 * eps_c * max(_scale(l1.detach().to(F64)), 1.0),
                                   msg=lambda m, r1=r1, r2=r2: f"linear {r1} vs {r2}: {m}")


@settings(max_examples=70, **SETTINGS)
@given(case=linear_cases)
def test_linear_cross_entropy_every_route_matches_float64_torch(case):
    _check_linear_case(case)


kdim_cases = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "dtype": st.sampled_from(DTYPES),
    "n": st.sampled_from([0, 1, 3, 4]),
    "d": st.sampled_from([1, 3]),
    "c": st.sampled_from([1, 2, 5]),
    "k": st.sampled_from([1, 2]),
    "bias": st.booleans(),
    "prob": st.booleans(),
    "reduction": st.sampled_from(["mean", "sum", "none"]),
    "ls": st.sampled_from([0.0, 0.2]),
    "zl": st.sampled_from([0.0, 0.1]),
    "cap": st.sampled_from([None, 1.5]),
    "chunk": st.sampled_from([None, 2]),
    "block": st.integers(1, 3),
})


@settings(max_examples=20, **SETTINGS)
@given(case=kdim_cases)
def test_linear_k_dimensional_weight_every_route_matches_float64_torch(case):
    """``linear_weight`` ``(C, d1, D)``: logits ``(N, C, d1)`` formed whole with
    ``F.linear`` in the input dtype (torch's values), then the fused cross-entropy."""
    g = torch.Generator().manual_seed(case["seed"])
    dtype, n, d, c, k = case["dtype"], case["n"], case["d"], case["c"], case["k"]
    x = torch.randn(n, d, generator=g, dtype=F64).to(dtype)
    wt = torch.randn(c, k, d, generator=g, dtype=F64).to(dtype)
    b = torch.randn(c, k, generator=g, dtype=F64).to(dtype) if case["bias"] else None
    if case["prob"]:
        t = torch.rand(n, c, k, generator=g, dtype=F64)
        t = (t / t.sum(1, keepdim=True)).to(dtype)
        t_rows = t.to(F64).movedim(1, -1).reshape(-1, c)
    else:
        t = torch.randint(0, c, (n, k), generator=g)
        t[torch.rand(n, k, generator=g) < 0.3] = -100
        t_rows = t.reshape(-1)
    opts = dict(reduction=case["reduction"], label_smoothing=case["ls"], z_loss=case["zl"],
                softcap=case["cap"])
    row_shape = (n, k)
    go = (torch.randn(row_shape, generator=g, dtype=F64) if case["reduction"] == "none"
          else torch.tensor(1.5, dtype=F64)).to(dtype).to(F64)
    # reference: torch's logits in the input dtype, their gradient through the exact product
    x64, w64 = x.to(F64).requires_grad_(), wt.to(F64).requires_grad_()
    b64 = None if b is None else b.to(F64).requires_grad_()
    exact = torch.einsum("nd,ckd->nck", x64, w64) + (0 if b64 is None else b64)
    low = torch.nn.functional.linear(x, wt.reshape(c * k, d),
                                     None if b is None else b.reshape(-1))
    z = exact + (low.reshape(n, c, k).to(F64) - exact).detach()
    rows = z.movedim(1, -1).reshape(-1, c)
    loss = _reference(rows, t_rows, None, ignore_index=-100, reduction=case["reduction"],
                      ls=case["ls"], zl=case["zl"], cap=case["cap"], num_items=None,
                      zero_term=True)
    loss = loss.reshape(row_shape) if case["reduction"] == "none" else loss
    inputs = [z, x64, w64] + ([b64] if b64 is not None else [])
    ref = torch.autograd.grad(loss, inputs, go)
    zmax = _scale(z.detach())
    gabs = ref[0].abs().movedim(1, -1).reshape(n, c * k)
    # plus the logits' and the backward matmuls' rounding in a low-precision dtype
    eps = _eps(_compute(dtype)) + (_eps(dtype) / 8 if dtype in (torch.bfloat16,
                                                                   torch.float16) else 0.0)
    for route in ("auto", "native", "rowblock"):
        seen: list = []
        if route == "native" and (case["zl"] or case["cap"] is not None):
            continue
        xl, wl = x.clone().requires_grad_(), wt.clone().requires_grad_()
        bl = None if b is None else b.clone().requires_grad_()
        extra = {} if case["chunk"] is None else {"chunk_size": case["chunk"]}
        with _route(route, case["block"], seen), (
                pytest.warns(UserWarning, match="ignored") if extra
                else contextlib.nullcontext()):
            out = xt.linear_cross_entropy(xl, wl, t, bl, backend=route if route != "auto"
                                          else "auto", **extra, **opts)
            got = torch.autograd.grad(out, [xl, wl] + ([bl] if bl is not None else []),
                                      go.to(out.dtype))
        ctx = dict(route=f"linear kdim {route} {seen}", zmax=zmax, eps=eps)
        _close("loss", out, loss, out_dtype=dtype, **ctx)
        _close("dx", got[0], ref[1], out_dtype=dtype,
               scale=_scale(gabs @ w64.detach().abs().reshape(c * k, d)), **ctx)
        _close("dW", got[1], ref[2], out_dtype=dtype,
               scale=_scale((gabs.t() @ x64.detach().abs()).reshape(c, k, d)), **ctx)
        if bl is not None:
            _close("db", got[2], ref[3], out_dtype=dtype, scale=_scale(gabs.sum(0)), **ctx)
