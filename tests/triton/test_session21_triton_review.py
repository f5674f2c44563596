"""Adversarial review (helper H68) of the Triton route of ``crossent.torch`` on CPU tensors
in triton's interpreter: today's kernel change (an ignored row's gradient is torch's: NaN
throughout where the row's max is not finite) and the autograd contract of
``backend="triton"`` (double backward, ``torch.func``, target/weight gradients, layouts,
0 rows, 1 class, float16/bfloat16).

References are independent of crossent: ``torch.nn.functional.cross_entropy`` in float64
(on the logits rounded to the tested dtype), with ``softcap`` as ``c tanh(z / c)`` and
``z_loss`` as ``z_loss * logsumexp(z)^2`` on counted rows, composed from torch ops."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

import crossent.torch as xt  # noqa: E402
from crossent.errors import UnsupportedError  # noqa: E402
from crossent.torch.modules import CrossEntropyLoss, LinearCrossEntropyLoss  # noqa: E402

if torch.cuda.is_available():  # the review targets the CPU interpreter
    pytest.skip("CPU interpreter review", allow_module_level=True)

from crossent.torch._triton import ops  # noqa: E402

F64 = torch.float64
INF, NAN = math.inf, math.nan
TOL = {F64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def ref_ce(z, y, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
           z_loss=0.0, softcap=None):
    """torch's cross-entropy (plus crossent's documented z-loss and softcap) in torch ops."""
    zc = z if softcap is None else softcap * torch.tanh(z / softcap)
    rows = F.cross_entropy(zc, y, weight=weight, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    if z_loss:
        lse = torch.logsumexp(zc, 1 if zc.dim() > 1 else 0)
        rows = rows + (z_loss * lse.square() if y.is_floating_point()
                       else torch.where(y != ignore_index, z_loss * lse.square(), 0.0))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if y.is_floating_point():
        return rows.sum() / y.shape[0]
    counted = y != ignore_index
    den = (counted.sum().to(z.dtype) if weight is None
           else weight[torch.where(counted, y, 0)].masked_fill(~counted, 0).sum())
    return rows.sum() / den


def same(got, want, tol):
    """Equal NaN and inf patterns, finite values within ``tol`` (relative to max(1, |want|))."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    fin = torch.isfinite(want)
    assert torch.equal(got[~fin & ~want.isnan()], want[~fin & ~want.isnan()]), (got, want)
    if fin.any():
        scale = max(1.0, float(want[fin].abs().max()))
        assert float((got[fin] - want[fin]).abs().max()) <= tol * scale, (got, want)


def ce_pair(z, y, dtype, *, go=None, inplace=False, weight=None, launch=None, **kw):
    """(loss, grad) of crossent's Triton route and of the float64 reference."""
    leaf = z.to(dtype).clone().requires_grad_()
    src = leaf * 1 if inplace else leaf
    w = None if weight is None else weight.to(dtype)
    with ops.override_ce_launch(**(launch or {"block": 16})):
        out = xt.cross_entropy(src, y, w, backend="triton", inplace_backward=inplace, **kw)
    out.backward(torch.ones_like(out) if go is None else go.to(out.dtype))
    ref = z.to(dtype).double().requires_grad_()
    want = ref_ce(ref, y, None if w is None else w.double(), **kw)
    want.backward(torch.ones_like(want) if go is None else go.double())
    return out, leaf.grad, want, ref.grad


def nonfinite_rows(n=8, c=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=F64) * 2
    z[0, c - 1] = NAN  # in the ragged last tile
    z[1, 5] = INF
    z[2] = -INF
    z[3, :16] = -INF  # a whole tile of -inf, the row's max finite
    z[4, 20] = -INF
    z[5, 0], z[5, 30] = INF, -INF
    return z


# ------------------------------------------------------- today's change: ignored rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("options", [
    {}, {"softcap": 3.0}, {"label_smoothing": 0.2, "weight": "inf"},
    {"label_smoothing": 0.2, "weight": "finite", "z_loss": 1e-2},
])
def test_ignored_rows_custom_ignore_index_nan_grad_output(dtype, inplace, options):
    """ignore_index = 7 (a valid class), 37 classes in tiles of 16, reduction "none" with
    NaN/+-inf grad_output on the ignored rows: torch's losses and NaN/0 gradient rows."""
    z = nonfinite_rows()
    y = torch.tensor([7, 7, 7, 7, 7, 7, 1, 36])
    go = torch.tensor([NAN, INF, -INF, NAN, INF, -INF, 2.0, 0.5])
    kw = dict(options)
    weight = None
    if "weight" in kw:
        weight = torch.rand(37, generator=torch.Generator().manual_seed(1), dtype=F64) + 0.5
        if kw.pop("weight") == "inf":
            weight[20] = INF
    out, grad, want, want_grad = ce_pair(z, y, dtype, go=go, inplace=inplace, weight=weight,
                                         ignore_index=7, reduction="none", **kw)
    same(out, want, TOL[dtype])
    same(grad, want_grad, TOL[dtype] * 4)


@pytest.mark.parametrize("launch", [{"block": 16, "reverse": True},
                                    {"block": 16, "programs_per_sm": 0.5},
                                    {"block": 32, "programs_per_sm": 1, "reverse": True}])
@pytest.mark.parametrize("ignore_index", [0, -1, 2**40])
def test_ignored_rows_every_launch_variant_in_place(launch, ignore_index):
    """Persistent grids and reversed pass 2, in place, float16, ignore_index = class 0, -1
    or beyond int32: torch's loss and gradient ("sum" and "mean" with class weights)."""
    z = nonfinite_rows(c=50, seed=2)
    y = torch.tensor([ignore_index] * 6 + [3, 49])
    w = torch.rand(50, generator=torch.Generator().manual_seed(3), dtype=F64) + 0.5
    for red in ("sum", "mean"):
        out, grad, want, want_grad = ce_pair(z, y, torch.float16, inplace=True, weight=w,
                                             launch=launch, ignore_index=ignore_index,
                                             reduction=red)
        same(out, want, TOL[torch.float16])
        same(grad, want_grad, TOL[torch.float16] * 4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_every_row_ignored_with_nonfinite_rows(reduction, smoothing):
    z = nonfinite_rows(n=6)
    y = torch.full((6,), -100)
    w = torch.rand(37, generator=torch.Generator().manual_seed(4), dtype=F64) + 0.5
    out, grad, want, want_grad = ce_pair(z, y, torch.float32, weight=w,
                                         label_smoothing=smoothing, reduction=reduction)
    same(out, want, 1e-5)
    same(grad, want_grad, 1e-5)


def _linear_pair(x, w, b, y, dtype, go=None, **kw):
    ps = [t.to(dtype).clone().requires_grad_() for t in (x, w, b)]
    weight = kw.pop("weight", None)
    with ops.override_ce_launch(block=16):
        out = xt.linear_cross_entropy(ps[0], ps[1], y, ps[2], backend="triton", chunk_size=3,
                                      weight=None if weight is None else weight.to(dtype), **kw)
    out.backward(torch.ones_like(out) if go is None else go.to(out.dtype))
    rs = [t.to(dtype).double().requires_grad_() for t in (x, w, b)]
    want = ref_ce(F.linear(*rs), y, None if weight is None else weight.to(dtype).double(), **kw)
    want.backward(torch.ones_like(want) if go is None else go.double())
    return [out, *(p.grad for p in ps)], [want, *(r.grad for r in rs)]


@pytest.mark.parametrize("case", ["nan", "inf", "-inf", "inf_weight_smoothing"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_head_ignored_rows_with_nonfinite_features(case, reduction):
    g = torch.Generator().manual_seed(5)
    x, w, b = (torch.randn(7, 5, generator=g, dtype=F64), torch.randn(37, 5, generator=g,
               dtype=F64), torch.randn(37, generator=g, dtype=F64))
    y = torch.tensor([-100, 2, -100, 5, -100, 1, 0])
    kw = {}
    if case == "nan":
        x[0, 2] = NAN
    elif case == "inf":
        x[2, 1] = INF
    elif case == "-inf":
        x[4, 0] = -INF
    else:
        kw = {"label_smoothing": 0.1, "weight": torch.rand(37, generator=g, dtype=F64) + 0.5}
        kw["weight"][9] = INF
    go = torch.tensor([NAN, 2.0, INF, 1.0, NAN, 3.0, 0.5]) if reduction == "none" else None
    got, want = _linear_pair(x, w, b, y, torch.float32, go=go, reduction=reduction,
                             softcap=None if kw else 4.0, **kw)
    for a, r in zip(got, want, strict=True):
        same(a, r, 1e-4)


def test_linear_head_ignored_row_whose_logits_overflow():
    x = torch.tensor([[1e30, 0.0, 0.0], [0.1, 0.2, 0.3], [0.3, -0.1, 0.2]])
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(6))
    w[:, 0] = 0.0
    w[3, 0] = 1e10  # ignored row 0's logit 3 is 1e40: +inf in float32
    y = torch.tensor([-100, 2, 1])
    ps = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    xt.linear_cross_entropy(*ps, y, backend="triton", chunk_size=2).backward()
    rs = [x.clone().requires_grad_(), w.clone().requires_grad_()]  # torch, same dtype
    F.cross_entropy(F.linear(*rs), y).backward()
    assert rs[0].grad[0].isnan().all() and rs[1].grad.isnan().all()
    assert torch.equal(ps[0].grad.isnan(), rs[0].grad.isnan())
    assert torch.equal(ps[1].grad.isnan(), rs[1].grad.isnan())


# ------------------------------------------------------------- the autograd contract


def _double(fn, z, red, v_requires_grad=True):
    leaf = z.clone().requires_grad_()
    out = fn(leaf)
    v = torch.linspace(0.5, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    v.requires_grad_(v_requires_grad)
    (g,) = torch.autograd.grad(out, leaf, v, create_graph=True)
    ((g * g.sin()).sum() + 0.3 * out.sum()).backward()
    return out, g, leaf.grad, v.grad


_DOUBLE_OPTIONS = [{}, {"label_smoothing": 0.2, "weight": True},
                   {"ignore_index": 4, "z_loss": 1e-2, "softcap": 5.0, "weight": True}]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("prob,options", [(False, o) for o in _DOUBLE_OPTIONS]
                         + [(True, o) for o in _DOUBLE_OPTIONS if "ignore_index" not in o])
def test_double_backward_matches_torch(prob, reduction, options):
    """Hessian-vector products and the gradient w.r.t. grad_output through
    ``create_graph=True``, float32 logits, against float64 torch."""
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(6, 37, generator=g, dtype=F64) * 2).float()
    y = (torch.softmax(torch.randn(6, 37, generator=g, dtype=F64), 1) if prob
         else torch.tensor([1, -100, 4, 36, 4, 0]) if "ignore_index" not in options
         else torch.tensor([1, 5, 4, 36, 4, 0]))
    kw = dict(options, reduction=reduction)
    w = torch.rand(37, generator=g, dtype=F64) + 0.5 if kw.pop("weight", False) else None
    got = _double(lambda q: xt.cross_entropy(
        q, y.float() if prob else y, None if w is None else w.float(), backend="triton",
        **kw), z, reduction)
    want = _double(lambda q: ref_ce(q, y, w, **kw), z.double(), reduction)
    for a, r in zip(got, want, strict=True):
        same(a, r, 1e-4)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_head_double_backward_matches_torch(reduction):
    g = torch.Generator().manual_seed(8)
    x, w, b = (torch.randn(5, 4, generator=g, dtype=F64), torch.randn(11, 4, generator=g,
               dtype=F64), torch.randn(11, generator=g, dtype=F64))
    y = torch.tensor([1, -100, 4, 10, 0])
    kw = {"reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0,
          "weight": torch.rand(11, generator=g, dtype=F64) + 0.5}
    results = []
    for fn in (lambda *p: xt.linear_cross_entropy(p[0], p[1], y, p[2], backend="triton",
                                                  chunk_size=2, **kw),
               lambda *p: ref_ce(F.linear(*p), y, **kw)):
        ps = [t.clone().requires_grad_() for t in (x, w, b)]
        out = fn(*ps)
        v = torch.linspace(0.5, 2.0, out.numel(), dtype=F64).reshape(out.shape).requires_grad_()
        grads = torch.autograd.grad(out, ps, v, create_graph=True)
        sum((q * q).sum() for q in grads).backward()
        results.append([out, *grads, *(p.grad for p in ps), v.grad])
    for a, r in zip(*results, strict=True):
        same(a, r, 1e-9)


def test_batched_grads_and_hessian_match_torch():
    g = torch.Generator().manual_seed(9)
    z = torch.randn(5, 11, generator=g, dtype=F64)
    y = torch.tensor([1, -100, 4, 10, 0])
    jac = torch.autograd.functional.jacobian(
        lambda q: F.cross_entropy(q, y, reduction="none"), z)
    leaf = z.clone().requires_grad_()
    out = xt.cross_entropy(leaf, y, backend="triton", reduction="none")
    (batched,) = torch.autograd.grad(out, leaf, torch.eye(5, dtype=F64), is_grads_batched=True)
    same(batched, jac, 1e-12)
    hess = torch.autograd.functional.hessian(
        lambda q: xt.cross_entropy(q, y, backend="triton"), z)
    same(hess, torch.autograd.functional.hessian(lambda q: F.cross_entropy(q, y), z), 1e-12)


@pytest.mark.parametrize("target", [2, -100])
def test_create_graph_gradient_of_a_row_with_plus_inf(target):
    z = torch.zeros(2, 5, dtype=F64)
    z[0, 4] = INF
    y = torch.tensor([target, 1])
    leaf = z.clone().requires_grad_()
    (got,) = torch.autograd.grad(xt.cross_entropy(leaf, y, backend="triton", reduction="sum"),
                                 leaf, create_graph=True)
    ref = z.clone().requires_grad_()
    (want,) = torch.autograd.grad(F.cross_entropy(ref, y, reduction="sum"), ref,
                                  create_graph=True)
    assert want[0].isnan().all()
    same(got, want, 1e-12)


def test_batched_gradient_of_a_row_with_plus_inf():
    z = torch.zeros(2, 4, dtype=F64)
    z[0, 3] = INF
    y = torch.tensor([1, 2])
    leaf = z.clone().requires_grad_()
    (got,) = torch.autograd.grad(xt.cross_entropy(leaf, y, backend="triton", reduction="none"),
                                 leaf, torch.eye(2, dtype=F64), is_grads_batched=True)
    ref = z.clone().requires_grad_()
    (want,) = torch.autograd.grad(F.cross_entropy(ref, y, reduction="none"), ref,
                                  torch.eye(2, dtype=F64), is_grads_batched=True)
    same(got, want, 1e-12)


def test_plain_backward_of_a_row_with_plus_inf_is_torchs():
    """The kernel's own gradient (no create_graph): NaN throughout, as torch's."""
    z = torch.zeros(3, 5, dtype=F64)
    z[0, 4], z[1, 2] = INF, INF
    y = torch.tensor([2, -100, 1])
    out, grad, want, want_grad = ce_pair(z, y, F64, reduction="sum")
    same(out, want, 1e-12)
    same(grad, want_grad, 1e-12)


_Z = torch.randn(4, 7, generator=torch.Generator().manual_seed(10), dtype=F64)
_Y = torch.tensor([1, -100, 6, 0])


def _loss(q):
    return xt.cross_entropy(q, _Y, backend="triton")


def _rows(q):
    return xt.cross_entropy(q, _Y, backend="triton", reduction="none")


@pytest.mark.parametrize("transform", [
    lambda: torch.func.grad(_loss)(_Z),
    lambda: torch.func.vjp(_loss, _Z)[1](torch.tensor(1.0, dtype=F64)),
    lambda: torch.func.jacrev(_rows)(_Z),
    lambda: torch.func.jacfwd(_rows)(_Z),
    lambda: torch.vmap(_loss)(_Z.expand(3, 4, 7)),
], ids=["grad", "vjp", "jacrev", "jacfwd", "vmap"])
def test_transforms_refused_loudly(transform):
    with pytest.raises(UnsupportedError, match=r"backend='triton' does not support torch\.func"):
        transform()


def test_functional_call_on_modules():
    g = torch.Generator().manual_seed(11)
    x, w, b = (torch.randn(5, 4, generator=g, dtype=F64), torch.randn(11, 4, generator=g,
               dtype=F64), torch.randn(11, generator=g, dtype=F64))
    y = torch.tensor([1, -100, 4, 10, 0])
    head = LinearCrossEntropyLoss(4, 11, bias=True, backend="triton", dtype=F64, chunk_size=2)
    params = {"linear.weight": w.clone().requires_grad_(),
              "linear.bias": b.clone().requires_grad_()}
    torch.func.functional_call(head, params, (x, y)).backward()
    rw, rb = w.clone().requires_grad_(), b.clone().requires_grad_()
    F.cross_entropy(F.linear(x, rw, rb), y).backward()
    same(params["linear.weight"].grad, rw.grad, 1e-12)
    same(params["linear.bias"].grad, rb.grad, 1e-12)
    with pytest.raises(UnsupportedError, match=r"torch\.func"):
        torch.func.grad(lambda p: torch.func.functional_call(head, p, (x, y)))(params)
    # a class weight swapped in that requires grad (probability targets: torch has it)
    loss = CrossEntropyLoss(weight=torch.ones(11, dtype=F64), backend="triton")
    t = torch.softmax(torch.randn(5, 11, generator=g, dtype=F64), 1)
    z = torch.randn(5, 11, generator=g, dtype=F64, requires_grad=True)
    with pytest.raises(UnsupportedError, match="class weight"):
        swapped = (torch.rand(11, dtype=F64) + 1).requires_grad_()
        torch.func.functional_call(loss, {"weight": swapped}, (z, t))


@pytest.mark.parametrize("case", ["target", "target_only", "weight", "linear_target",
                                  "linear_weight"])
def test_target_and_weight_gradients_refused_loudly(case):
    g = torch.Generator().manual_seed(12)
    z = torch.randn(4, 6, generator=g, dtype=F64, requires_grad=True)
    t = torch.softmax(torch.randn(4, 6, generator=g, dtype=F64), 1)
    wt = (torch.rand(6, generator=g, dtype=F64) + 0.5).requires_grad_()
    x, lw = torch.randn(4, 3, dtype=F64), torch.randn(6, 3, dtype=F64, requires_grad=True)
    with pytest.raises(UnsupportedError, match="backend='triton' does not support a gradient"):
        if case == "target":
            xt.cross_entropy(z, t.requires_grad_(), backend="triton")
        elif case == "target_only":
            xt.cross_entropy(z.detach(), t.requires_grad_(), backend="triton")
        elif case == "weight":
            xt.cross_entropy(z, t, wt, backend="triton")
        elif case == "linear_target":
            xt.linear_cross_entropy(x, lw, t.requires_grad_(), backend="triton")
        else:
            xt.linear_cross_entropy(x, lw, t, weight=wt, backend="triton")


_LAYOUTS = {
    "transposed": (lambda p: p.t(), (13, 6), _ys := torch.tensor([1, -100, 4, 12, 0, 3])),
    "class_stride_2": (lambda p: p[:, ::2], (6, 26), _ys),
    "row_stride_2": (lambda p: p[1::2], (12, 13), _ys),
    "expanded_rows": (lambda p: p.expand(6, 13), (1, 13), _ys),
    "zero_stride_classes": (lambda p: p.expand(6, 13), (6, 1), _ys.clamp(max=0)),
    "neg_view": (lambda p: torch._neg_view(p), (6, 13), _ys),
    "overlapping": (lambda p: p.as_strided((6, 13), (2, 1)), (30,), _ys),
    "movedim_3d": (lambda p: p.movedim(2, 1), (2, 3, 13), _ys.reshape(2, 3)),
    "unbatched": (lambda p: p, (13,), torch.tensor(4)),
    "zero_rows": (lambda p: p, (0, 13), torch.zeros(0, dtype=torch.long)),
    "zero_rows_3d": (lambda p: p, (2, 13, 0), torch.zeros(2, 0, dtype=torch.long)),
    "one_class": (lambda p: p, (6, 1), torch.tensor([0, -100, 0, 0, 0, 0])),
}


@pytest.mark.parametrize("layout", list(_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layouts_and_sizes(layout, dtype):
    make, shape, y = _LAYOUTS[layout]
    p = torch.randn(*shape, generator=torch.Generator().manual_seed(13), dtype=F64).to(dtype)
    for inplace, kw in ((False, {"reduction": "mean"}),
                        (True, {"reduction": "none", "label_smoothing": 0.1}),
                        (True, {"reduction": "sum", "z_loss": 1e-2, "softcap": 4.0})):
        leaf = p.clone().requires_grad_()
        with ops.override_ce_launch(block=16):
            out = xt.cross_entropy(make(leaf * 1 if inplace else leaf), y, backend="triton",
                                   inplace_backward=inplace, **kw)
        go = torch.linspace(0.5, 2.0, out.numel()).reshape(out.shape)
        out.backward(go.to(out.dtype))
        ref = p.double().requires_grad_()
        want = ref_ce(make(ref), y, **kw)
        want.backward(go.double())
        same(out, want, TOL[dtype])
        same(leaf.grad, ref.grad, TOL[dtype] * 4)


def test_inplace_on_n_c_1_input_is_overwritten_as_documented():
    """(N, C, 1) flattens to a view: the docstring (fixed after H68) says it is
    overwritten, (N, C, d1 > 1) works on a copy."""
    h = torch.randn(3, 5, 1, dtype=F64, requires_grad=True)
    logits = h * 1
    before = logits.detach().clone()
    loss = xt.cross_entropy(logits, torch.tensor([[1], [2], [0]]), backend="triton",
                            inplace_backward=True)
    loss.backward()
    ref = h.detach().clone().requires_grad_()
    F.cross_entropy(ref, torch.tensor([[1], [2], [0]])).backward()
    same(h.grad, ref.grad, 1e-12)  # the gradient itself is right
    same(logits.detach(), ref.grad, 1e-12)  # the view held the gradient
    assert not torch.equal(logits.detach(), before)
    h2 = torch.randn(3, 5, 2, dtype=F64, requires_grad=True)
    logits2 = h2 * 1
    before2 = logits2.detach().clone()
    xt.cross_entropy(logits2, torch.tensor([[1, 0], [2, 4], [0, 3]]), backend="triton",
                     inplace_backward=True).backward()
    assert torch.equal(logits2.detach(), before2)
