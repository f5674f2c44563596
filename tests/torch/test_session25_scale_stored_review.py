"""Review H86 of the uncommitted change over 3843cde: the compiled CPU backward's operator
``crossent::scale_stored_grad_cpu`` (``_custom_ops._scale_stored_grad_cpu``, ``_ce_setup``,
``_ce_backward``), which scales the gradient stored in forward and reads the target and
class weight (no longer the logits or ``num_items``); ``Call.compiled_kernel`` only under
``backend="auto"``; the docs' rows on in-place changes and NaN/inf ``grad_output``.

References: torch's eager ``F.cross_entropy`` (values and NaN/inf pattern) and torch under
the same compile backend (what raises). A bug is a test written as it should pass, marked
``xfail(strict=True, reason="BUG H86-n: ...")``; everything else is a regression guard.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt

INF = math.inf
NAN = math.nan
C = 7
_TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2,
        torch.float16: 2e-3}


def _compiled(fn, backend):
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True)


def _same(got, want, tol=1e-6):
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[got.isinf()], want[want.isinf()])
    finite = got.isfinite()
    torch.testing.assert_close(got[finite].double(), want[finite].double(), rtol=tol,
                               atol=tol)


def _case(dtype, shape, target, weight, reduction, go_kind, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs, ts = {"2d": ((5, C), (5,)), "spatial": ((2, C, 3), (2, 3)), "1d": ((C,), ()),
              "empty": ((0, C), (0,))}[shape]
    z = (torch.randn(zs, generator=g) * 3).to(dtype)
    if target == "index":
        t = torch.randint(0, C, ts, generator=g)
        if t.numel() > 1:
            t.view(-1)[1] = ignore_index
    else:
        t = torch.softmax(torch.randn(zs, generator=g), 1 if len(zs) > 1 else 0).to(dtype)
    w = {None: None, "positive": torch.rand(C, generator=g) + 0.5,
         "zero_negative": torch.tensor([1.0, 0.0, -0.5, 2.0, 1.0, 0.0, 1.0])}[weight]
    w = None if w is None else w.to(dtype)
    loss_shape = ts if reduction == "none" else ()
    if go_kind == "rows":
        go = torch.randn(loss_shape, generator=g)
        if go.numel() > 2:
            go.view(-1)[0], go.view(-1)[2] = INF, NAN
    else:
        go = torch.full(loss_shape, {"inf": INF, "-inf": -INF, "nan": NAN, "0": 0.0}[go_kind])
    return z, t, w, go.to(dtype)


def _grad(fn, z, t, w, go, backend=None, **kw):
    x = z.clone().requires_grad_()

    def loss(a, b, c):
        return fn(a, b, weight=c, **kw)

    (_compiled(loss, backend) if backend else loss)(x, t, w).backward(go)
    return x.grad


# ---- values and NaN/inf pattern: compiled crossent against eager torch


@pytest.mark.parametrize(("dtype", "shape", "target", "smoothing", "weight", "reduction",
                          "go_kind", "ignore_index"), [
    (torch.float32, "2d", "index", 0.0, "zero_negative", "none", "rows", -100),
    (torch.float32, "2d", "index", 0.1, "zero_negative", "mean", "-inf", -100),
    (torch.float32, "2d", "index", 0.0, "positive", "sum", "inf", 0),  # a real class ignored
    (torch.float32, "2d", "index", 0.0, None, "mean", "nan", 3),
    (torch.float32, "2d", "prob", 0.1, "zero_negative", "sum", "inf", -100),
    (torch.float32, "2d", "prob", 0.0, "positive", "none", "rows", -100),
    (torch.float32, "spatial", "index", 0.1, "positive", "none", "rows", -100),
    (torch.float32, "spatial", "prob", 0.0, None, "mean", "-inf", -100),
    (torch.float32, "1d", "index", 0.0, "positive", "none", "inf", -100),
    (torch.float32, "1d", "prob", 0.1, None, "sum", "-inf", -100),
    (torch.float32, "empty", "index", 0.0, None, "sum", "inf", -100),
    (torch.float32, "empty", "prob", 0.0, "positive", "none", "0", -100),
    (torch.float32, "2d", "index", 0.0, None, "none", "0", -100),
    (torch.float64, "2d", "index", 0.1, "zero_negative", "none", "rows", -100),
    (torch.float64, "spatial", "prob", 0.0, "positive", "sum", "nan", -100),
    (torch.bfloat16, "2d", "index", 0.0, "positive", "sum", "-inf", -100),
    (torch.bfloat16, "spatial", "index", 0.1, None, "none", "rows", -100),
    (torch.float16, "2d", "prob", 0.1, None, "none", "rows", -100),
    (torch.float16, "2d", "index", 0.0, "zero_negative", "mean", "inf", -100),
], ids=str)
def test_compiled_grad_output_patterns_are_eager_torchs(dtype, shape, target, smoothing,
                                                         weight, reduction, go_kind,
                                                         ignore_index):
    z, t, w, go = _case(dtype, shape, target, weight, reduction, go_kind, ignore_index)
    kw = {"reduction": reduction, "label_smoothing": smoothing}
    if target == "index":
        kw["ignore_index"] = ignore_index
    want = _grad(F.cross_entropy, z, t, w, go, **kw)
    _same(_grad(xt.cross_entropy, z, t, w, go, "aot_eager", **kw), want, _TOL[dtype])


@pytest.mark.parametrize("go_kind", ["inf", "rows"])
def test_compiled_eager_backend_spatial_weighted(go_kind):
    z, t, w, go = _case(torch.float32, "spatial", "index", "zero_negative", "none", go_kind)
    _same(_grad(xt.cross_entropy, z, t, w, go, "eager", reduction="none"),
          _grad(F.cross_entropy, z, t, w, go, reduction="none"))


def test_retain_graph_backward_three_times_with_infinite_finite_nan():
    z, t, _, _ = _case(torch.float32, "2d", "index", None, "none", "0")
    outs = []
    for fn, backend in ((F.cross_entropy, None), (xt.cross_entropy, "aot_eager")):
        x = z.clone().requires_grad_()

        def loss(a, fn=fn):
            return fn(a * 1.0, t, reduction="none", label_smoothing=0.1)

        out = (_compiled(loss, backend) if backend else loss)(x)
        grads = []
        for go in (torch.full((5,), INF), torch.arange(5.0), torch.full((5,), NAN)):
            x.grad = None
            out.backward(go, retain_graph=True)
            grads.append(x.grad)
        outs.append(grads)
    for got, want in zip(outs[1], outs[0], strict=True):
        _same(got, want)


# ---- in-place changes between forward and backward


def _logits_view_changed(fn, backend, view, go):
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(5)).requires_grad_()
    t = torch.tensor([0, 3, -100, 9, 1, 2])

    def forward(a, b):
        h = a * 1.0
        logits = h[:, :10] if view == "slice" else h.t().contiguous().t()[:, 1:11]
        return fn(logits, b), h

    loss, h = (_compiled(forward, backend) if backend else forward)(x, t)
    with torch.no_grad():
        h.mul_(2.0)  # the base of the logits' view
    loss.backward(torch.tensor(go))
    return x.grad


@pytest.mark.parametrize("go", [1.0, INF, -3.0])
@pytest.mark.parametrize("view", ["slice", "transposed_slice"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_logits_view_base_changed_after_compiled_forward_is_torchs(backend, view, go):
    _same(_logits_view_changed(xt.cross_entropy, backend, view, go),
          _logits_view_changed(F.cross_entropy, None, view, go))


def _changed(fn, backend, what, prob=False):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, C, generator=g)
    base = torch.cat([torch.tensor([0, 3, -100, 6, 1, 2])] * 2)
    t = (torch.softmax(torch.randn(6, C, generator=g), 1) if prob else base[:6])
    w = torch.rand(2 * C, generator=g)[::2] + 0.5  # a strided view
    x = z.clone().requires_grad_()

    def forward(a, b, c):
        return fn(a * 1.0, b, weight=c, reduction="sum")

    loss = (_compiled(forward, backend) if backend else forward)(x, t, w)
    with torch.no_grad():
        if what == "target_base":
            (t if prob else base[7:]).add_(0)  # another part of the target's memory
        else:
            w.mul_(1.0)
    loss.backward(torch.tensor(INF))
    return x.grad


@pytest.mark.parametrize("prob", [False, True], ids=["index", "probabilities"])
@pytest.mark.parametrize("what", ["target_base", "weight_view"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_target_or_weight_changed_through_a_view_raises_as_torch(backend, what, prob):
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _changed(F.cross_entropy, backend, what, prob)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _changed(xt.cross_entropy, backend, what, prob)


def _num_items_changed(fn, backend, route):
    z = torch.randn(6, C, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 3, -100, 6, 1, 2])
    x = z.clone().requires_grad_()
    n = torch.tensor(4.0)

    def forward(a, b, m):
        if fn is None:  # the reference the docs give: torch's sum / n
            return F.cross_entropy(a * 1.0, b, reduction="sum") / m
        return fn(a * 1.0, b, reduction="sum", num_items=m, backend=route)

    loss = (_compiled(forward, backend) if backend else forward)(x, t, n)
    with torch.no_grad():
        n.add_(1.0)  # a count buffer refilled before backward
    loss.backward()
    return x.grad


@pytest.mark.parametrize(("backend", "route"), [(None, "auto"), (None, "rowblock"),
                                                ("aot_eager", "auto")])
def test_num_items_changed_in_place_raises_as_torchs_sum_over_n(backend, route):
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _num_items_changed(None, backend, route)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _num_items_changed(xt.cross_entropy, backend, route)


# ---- torch.func over a compiled loss


# H86-1 (fixed at stop 36): torch.func.grad of a torch.compile'd loss calling crossent
# failed in dynamo: crossent::cross_entropy_fwd's autograd under a functorch transform
# ("must override the setup_context staticmethod"), also without fullgraph. Under a
# transform the call now runs the eager entry point (a graph break).
_REF = {"cross_entropy": lambda a, x, w, t: F.cross_entropy(a, t),
        "linear": lambda a, x, w, t: F.cross_entropy(F.linear(x, w), t)}
_OURS = {"cross_entropy": lambda a, x, w, t: xt.cross_entropy(a, t),
         "linear": lambda a, x, w, t: xt.linear_cross_entropy(x, w, t)}


def _transformed(fn, transform, inputs):
    g = torch.Generator().manual_seed(8)
    if transform == "grad":
        return torch.func.grad(fn, argnums=(0, 1, 2))(*inputs)
    if transform == "jacrev":
        return torch.func.jacrev(fn, argnums=(0, 1, 2))(*inputs)
    if transform == "jvp":
        tangents = tuple(torch.randn(i.shape, generator=g, dtype=i.dtype) for i in inputs)
        return torch.func.jvp(fn, inputs, tangents)
    if transform == "vmap":
        batch = tuple(torch.stack([i, 2 * i, -i]) for i in inputs)
        return (torch.func.vmap(fn)(*batch),)
    raise AssertionError(transform)


_EVERY_TRANSFORM = [("eager", loss, transform) for loss in ("cross_entropy", "linear")
                    for transform in ("grad", "jacrev", "jvp", "vmap")]


# every transform on dynamo's "eager" backend; AOTAutograd on a few, inductor (seconds of
# compilation) on one
@pytest.mark.parametrize(("backend", "loss", "transform"), [
    *_EVERY_TRANSFORM, ("aot_eager", "cross_entropy", "grad"),
    ("aot_eager", "cross_entropy", "vmap"), ("aot_eager", "linear", "grad"),
    ("inductor", "cross_entropy", "grad")])
def test_func_transform_of_a_compiled_loss_is_torchs(backend, loss, transform):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    w = torch.randn(C, 3, generator=g, dtype=torch.float64)
    z = F.linear(x, w)
    t = torch.tensor([0, 3, -100, 6, 1, 2])
    want = _transformed(lambda a, x, w: _REF[loss](a, x, w, t), transform, (z, x, w))
    torch._dynamo.reset()
    fn = torch.compile(lambda a, x, w: _OURS[loss](a, x, w, t), backend=backend)
    got = _transformed(fn, transform, (z, x, w))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the same compiled function without a transform: the operator again, torch's value
    torch.testing.assert_close(fn(z, x, w), _REF[loss](z, x, w, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_func_transform_inside_a_compiled_function_is_torchs(transform):
    """The transform called inside the compiled function (dynamo traces it)."""
    z = torch.randn(2, 6, C, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = torch.tensor([0, 3, -100, 6, 1, 2])
    apply = getattr(torch.func, transform)
    pick = (lambda a: a[0]) if transform == "grad" else (lambda a: a)  # grad: a scalar
    want = apply(lambda a: F.cross_entropy(pick(a), t))(z)
    torch._dynamo.reset()
    fn = torch.compile(lambda b: apply(lambda a: xt.cross_entropy(pick(a), t))(b),
                       backend="aot_eager")
    torch.testing.assert_close(fn(z), want, rtol=1e-12, atol=1e-12)


def test_the_constant_mark_is_torchs_and_dynamo_is_not_imported_with_crossent():
    """_under_func_transform carries the mark torch.compiler.assume_constant_result sets
    (set by hand: the decorator imports dynamo, which cost importing crossent.torch ~1.7 s
    and looked for sklearn); a torch whose decorator does more fails here."""
    import subprocess
    import sys

    from crossent.torch import _custom_ops

    def probe():
        return True

    marked = torch.compiler.assume_constant_result(probe)
    assert marked is probe and set(vars(probe)) == {"_dynamo_marked_constant"}
    assert _custom_ops._under_func_transform._dynamo_marked_constant is True
    code = "import sys, crossent.torch; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["False"], out


def test_func_grad_of_a_compiled_loss_under_fullgraph_is_refused_naming_the_transform():
    """A transform needs the eager entry point, a graph break: fullgraph=True refuses it
    with dynamo's error, whose reason names crossent and the transform."""
    z = torch.randn(6, C, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0, 3, -100, 6, 1, 2])
    with pytest.raises(Exception, match=r"torch\.func transform") as info:
        torch.func.grad(_compiled(lambda a: xt.cross_entropy(a, t), "eager"))(z)
    assert "crossent.torch.cross_entropy" in str(info.value)


# ---- the operator


@pytest.mark.parametrize("case", ["go_broadcast_strided", "zero_rows_spatial",
                                  "float64_weight_index", "ignore_index_none"])
def test_opcheck_more_arguments(case):
    g = torch.Generator().manual_seed(6)
    args = {
        # a per-row grad_output that is a strided view; spatial rows of 0 positions
        "go_broadcast_strided": lambda: (torch.rand(4, 5, generator=g),
                                         torch.rand(8, generator=g)[::2],
                                         torch.tensor([0, 1, -100, 4]), None, -100, False),
        "zero_rows_spatial": lambda: (torch.rand(2, 5, 0), torch.ones(2, 0),
                                      torch.zeros(2, 0, dtype=torch.long),
                                      torch.rand(5), -100, True),
        "float64_weight_index": lambda: (torch.rand(3, 5, dtype=torch.float64),
                                         torch.tensor(-2.0, dtype=torch.float64),
                                         torch.tensor([4, 0, 2]),
                                         torch.rand(5, dtype=torch.float64), 0, False),
        "ignore_index_none": lambda: (torch.rand(3, 5), torch.tensor(3.0),
                                      torch.tensor([4, 0, 2]), None, None, False),
    }[case]()
    # stop 35: the weight is no longer an argument (crossent::read_saved reads it)
    args = (*args[:3], *args[4:], None)  # whole_rows (stop 34, H86-3)
    result = torch.library.opcheck(torch.ops.crossent.scale_stored_grad_cpu.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


# ---- inductor, once: torch eager's pattern; logits free to change; target/weight checked


@pytest.mark.timeout(300)
def test_inductor_spatial_strided_grad_output_and_in_place_changes():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 10, 3, generator=g)
    t = torch.randint(0, 10, (2, 3), generator=g)
    t[0, 1] = -100
    w = torch.rand(10, generator=g) + 0.5
    go = torch.randn(3, 2, generator=g).t()  # not contiguous
    go[0, 0], go[1, 2], go[1, 0] = INF, -INF, NAN

    def forward(a, b, c, fn=xt.cross_entropy):
        h = a * 1.0
        return fn(h, b, weight=c, reduction="none"), h

    torch._dynamo.reset()
    compiled = torch.compile(forward, backend="inductor", fullgraph=True)

    def run(fn, change):
        x, tt, ww = z.clone().requires_grad_(), t.clone(), w.clone()
        loss, h = fn(x, tt, ww)
        with torch.no_grad():
            {"none": x, "logits": h, "target": tt, "weight": ww}[change].add_(
                1.0 if change == "logits" else 0)
        loss.backward(go)
        return x.grad

    want = run(lambda a, b, c: forward(a, b, c, F.cross_entropy), "none")
    for change in ("none", "logits"):
        _same(run(compiled, change), want)
    for change in ("target", "weight"):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            run(compiled, change)


# ---- z_loss under an infinite grad_output: rows whose logsumexp is negative


def _z_loss_reference(a, b, reduction="sum", z_loss=1e-3):
    """torch's formula: cross-entropy plus z_loss * lse**2 on the counted rows."""
    loss = F.cross_entropy(a, b, reduction="none") + z_loss * torch.logsumexp(a, 1) ** 2
    loss = torch.where(b != -100, loss, 0.0)
    return loss.sum() if reduction == "sum" else loss


def _z_loss_data():
    z = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    z[1] -= 10.0  # logsumexp < 0 on row 1 (logits all well below 0)
    return z, torch.tensor([1, 2, -100, 3])


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_eager_z_loss_infinite_grad_output_is_torchs_formula(reduction):
    """Guard: eager crossent gives the formula's whole-row NaN where lse < 0 (the
    cross-entropy's +inf p_j meets the z-loss's -inf 2 z lse p_j)."""
    z, t = _z_loss_data()
    go = torch.tensor(INF) if reduction == "sum" else torch.full((4,), INF)
    want = _grad(lambda a, b, weight: _z_loss_reference(a, b, reduction), z, t, None, go)
    assert want[1].isnan().all()
    _same(_grad(xt.cross_entropy, z, t, None, go, reduction=reduction, z_loss=1e-3), want)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_z_loss_infinite_grad_output_on_negative_lse_rows(backend, reduction):
    """Fixed at stop 34 (H86-3): the compiled CPU backward asks forward for the rows' lse
    and makes the rows with z_loss * lse <= 0 whole-row NaN, as torch's formula
    (statistics= still returns only what was asked)."""
    z, t = _z_loss_data()
    z[3] -= 10.0  # a second row below 0
    go = torch.tensor(INF) if reduction == "sum" else torch.tensor([INF, -INF, 2.0, INF])
    zl = 1e-3
    want = _grad(lambda a, b, weight: _z_loss_reference(a, b, reduction, zl), z, t, None,
                 go)
    assert want[1].isnan().all() and want[3].isnan().all() and not want[0].isnan().all()
    _same(_grad(xt.cross_entropy, z, t, None, go, backend, reduction=reduction,
                z_loss=zl), want)
    _, stats = _compiled(lambda a, b: xt.cross_entropy(
        a, b, z_loss=zl, statistics=("accuracy",)), backend)(z.clone().requires_grad_(), t)
    assert stats.lse is None and stats.accuracy is not None
