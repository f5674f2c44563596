"""Review H84 of commit 3843cde: (1) the compiled CPU backward's new operator
``crossent::cross_entropy_scale_cpu`` (``_custom_ops._cross_entropy_scale_cpu``,
``_ce_setup``, ``_ce_backward``), which recomputes eager crossent's backward for an
infinite ``grad_output`` and, for that, saves the logits and ``num_items`` on CPU;
(2) ``set_compiled_kernel(True)`` reached under ``backend="auto"`` (``_inductor.takes``,
``Call.compiled_kernel``, ``_backends._few_classes_route``).

References: torch's ``F.cross_entropy`` under the same compile backend (NaN/inf pattern,
values within rounding), torch's own formulas for ``z_loss``/``softcap``, float64 torch
for the compiled kernel's numbers. A bug is a test written as it should pass, marked
``xfail(strict=True, reason="BUG H84-n: ...")``; everything else is a regression guard.

Fixed at stop 34 (the markers removed): H84-1, an in-place change of the logits after a
compiled forward made every CPU backward raise torch's version error (the operator saved
the logits with ``save_for_backward`` for its recompute): the recompute is gone (the
operator is now ``crossent::scale_stored_grad_cpu``, reading target and weight only; an
infinite grad_output on stored entries that rounded to 0 is a documented difference,
tests/torch/test_compile_grad_output.py); H84-2, eager's refusal names an infinite
``grad_output``; H84-3, the operator's fake and body give a contiguous gradient.
Also: ``$CROSSENT_COMPILED_KERNEL`` is read only by calls that could use the kernel, and
spatial logits keep torch's kernel with the opt-in on.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import crossent.torch as xt
from crossent.errors import InputError
from crossent.torch import _inductor

INF = math.inf
IGNORE = -100


def _data(n=6, c=300, seed=0, far=-120.0):
    """Logits with entries whose p_j underflows float32's subnormals (so the stored
    gradient holds 0 where torch's infinite-grad_output gradient is +-inf)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g)
    z[0, 5] = far
    z[1, 9] = far
    t = torch.randint(0, c, (n,), generator=g)
    t[0], t[2] = 7, IGNORE
    return z, t


def _grad(fn, z, t, go, **kw):
    x = z.clone().requires_grad_()
    fn(x, t, **kw).backward(go)
    return x.grad


def _compiled(fn, backend, **kw):
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, **kw)


def _same(got, want, exact=None, rtol=1e-6, atol=1e-7):
    """The NaN/inf pattern and infinite values of ``want``; finite values within
    rounding of ``exact`` (default ``want``)."""
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[got.isinf()], want[want.isinf()])
    exact = want if exact is None else exact
    fin = got.isfinite()
    torch.testing.assert_close(got[fin].double(), exact[fin].double(), rtol=rtol, atol=atol)


def _grad_output(reduction, n=6):
    if reduction != "none":
        return torch.tensor(INF if reduction == "sum" else -INF)
    go = torch.tensor([INF, -INF, INF, math.nan, 0.0, 2.0])[:n]  # row 2 is ignored
    return go


# ---- (1) the compiled CPU backward with an infinite grad_output


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(("backend", "options"), [
    ("eager", "plain"), ("eager", "weight+smoothing"), ("aot_eager", "plain"),
    ("aot_eager", "weight"), ("aot_eager", "smoothing"), ("aot_eager", "weight+smoothing")])
def test_index_targets_mixed_grad_output_is_torchs_under_the_same_backend(
        reduction, options, backend):
    """Per-row grad_output mixing inf/-inf/NaN/0/finite (one on an ignored row), class
    weights with zero and negative entries, label smoothing: torch's pattern and values."""
    z, t = _data()
    kw = {"reduction": reduction}
    if "weight" in options:
        w = torch.rand(300, generator=torch.Generator().manual_seed(1)) + 0.5
        w[7], w[t[3]], w[9] = 0.0, -2.0, 0.0
        kw["weight"] = w
    if "smoothing" in options:
        kw["label_smoothing"] = 0.2
    go = _grad_output(reduction)
    got = _grad(_compiled(xt.cross_entropy, backend), z, t, go, **kw)
    want = _grad(_compiled(F.cross_entropy, backend), z, t, go, **kw)
    _same(got, want)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_probability_targets_with_minus_inf_logits(reduction, smoothing):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 5, generator=g)
    z[1, 2] = -INF
    z[0, 3] = -120.0
    p = torch.softmax(torch.randn(6, 5, generator=g), 1)
    p[1, 2] = 0.0
    p = p / p.sum(1, keepdim=True)
    go = _grad_output(reduction)
    kw = {"reduction": reduction, "label_smoothing": smoothing}
    got = _grad(_compiled(xt.cross_entropy, "aot_eager"), z, p, go, **kw)
    want = _grad(_compiled(F.cross_entropy, "aot_eager"), z, p, go, **kw)
    _same(got, want)


def _z_loss_softcap_reference(z, t, reduction="mean", z_loss=0.0, softcap=None):
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, t, reduction="none")
    counted = t != IGNORE
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(z, 1) ** 2
    loss = torch.where(counted, loss, 0.0)
    return {"none": loss, "sum": loss.sum(), "mean": loss.sum() / counted.sum()}[reduction]


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("kw", [{"z_loss": 1e-3}, {"softcap": 30.0},
                                {"z_loss": 1e-2, "softcap": 50.0}], ids=str)
def test_z_loss_and_softcap_are_torchs_formula(reduction, kw):
    z, t = _data()
    go = _grad_output(reduction)
    got = _grad(_compiled(xt.cross_entropy, "aot_eager"), z, t, go, reduction=reduction, **kw)
    want = _grad(_z_loss_softcap_reference, z, t, go, reduction=reduction, **kw)
    _same(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_items", [4, torch.tensor(4), torch.tensor(4.0)],
                         ids=["int", "long0d", "float0d"])
def test_num_items_number_and_tensor(num_items):
    z, t = _data()
    go = torch.tensor(-INF)
    got = _grad(_compiled(xt.cross_entropy, "aot_eager"), z, t, go, reduction="sum",
                num_items=num_items)
    want = _grad(lambda a, b: F.cross_entropy(a, b, reduction="sum") / 4, z, t, go)
    _same(got, want)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_loss_dtype_float64_and_a_huge_float64_grad_output(reduction):
    """A float64 loss of float32 logits: grad_output 1e300 is inf in float32 (torch's
    ToCopyBackward), and recomputes."""
    z, t = _data()
    go = (torch.tensor([1e300, -1e300, 1e300, 1.0, 0.0, 2.0], dtype=torch.float64)
          if reduction == "none" else torch.tensor(1e300, dtype=torch.float64))
    got = _grad(_compiled(xt.cross_entropy, "aot_eager"), z, t, go, reduction=reduction,
                loss_dtype=torch.float64)
    want = _grad(lambda a, b, **k: F.cross_entropy(a, b, **k).double(), z, t, go,
                 reduction=reduction)
    _same(got, want)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_autocast_bfloat16_on_cpu(reduction):
    z, t = _data()

    def under_autocast(fn):
        def run(a, b, **k):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(a * 1, b, **k)
        return run

    go = _grad_output(reduction)
    got = _grad(_compiled(under_autocast(xt.cross_entropy), "aot_eager"), z, t, go,
                reduction=reduction)
    want = _grad(_compiled(under_autocast(F.cross_entropy), "aot_eager"), z, t, go,
                 reduction=reduction)
    _same(got, want, rtol=2.0 ** -7, atol=1e-5)


@pytest.mark.parametrize("statistics", [("accuracy",), ("lse", "entropy")], ids=str)
def test_statistics_keep_the_recompute(statistics):
    z, t = _data()
    go = _grad_output("none")
    got = _grad(_compiled(lambda a, b, **k: xt.cross_entropy(a, b, statistics=statistics,
                                                             **k)[0], "aot_eager"),
                z, t, go, reduction="none")
    _same(got, _grad(F.cross_entropy, z, t, go, reduction="none"))


@pytest.mark.parametrize("backend", ["native", "rowblock"])
def test_explicit_backends_under_compile(backend):
    z, t = _data()
    for reduction in ("none", "sum"):
        go = _grad_output(reduction)
        got = _grad(_compiled(xt.cross_entropy, "aot_eager"), z, t, go, reduction=reduction,
                    backend=backend)
        _same(got, _grad(F.cross_entropy, z, t, go, reduction=reduction))


@pytest.mark.parametrize("layout", ["transposed", "spatial"])
def test_non_contiguous_and_spatial_logits(layout):
    if layout == "transposed":
        g = torch.Generator().manual_seed(4)
        base = torch.randn(300, 6, generator=g)
        base[5, 0] = -120.0
        t = torch.tensor([0, 1, IGNORE, 3, 4, 2])

        def view(x):
            return x.t()
        go = _grad_output("none")
    else:
        g = torch.Generator().manual_seed(4)
        base = torch.randn(2, 70, 3, generator=g)
        base[0, 1, 2] = -120.0
        t = torch.tensor([[0, 1, IGNORE], [3, 2, 1]])

        def view(x):
            return x * 1
        go = torch.tensor([[INF, 1.0, INF], [-INF, 2.0, 0.0]])
    for reduction in ("none", "mean"):
        g_out = go if reduction == "none" else torch.tensor(INF)
        got = _grad(_compiled(lambda a, b, **k: xt.cross_entropy(view(a), b, **k),
                              "aot_eager"), base, t, g_out, reduction=reduction)
        want = _grad(lambda a, b, **k: F.cross_entropy(view(a), b, **k), base, t, g_out,
                     reduction=reduction)
        _same(got, want)


def test_dynamic_shapes_reuse_one_graph():
    results = []
    for fn in (xt.cross_entropy, F.cross_entropy):
        f = _compiled(fn, "aot_eager", dynamic=True)
        for n in (5, 7, 9):
            z, t = _data(n=n, seed=n)
            go = torch.full((n,), INF)
            go[3], go[-1] = -INF, 2.0
            results.append(_grad(f, z, t, go, reduction="none"))
            results.append(_grad(f, z, t, torch.tensor(-INF), reduction="mean"))
    half = len(results) // 2
    for got, want in zip(results[:half], results[half:], strict=True):
        _same(got, want)


def test_inductor_gives_eager_torchs_numbers():
    """Under inductor torch's own decomposition turns these rows all NaN (its
    ``exp(logp) * sum(g)``); crossent keeps eager torch's +-inf, which is the better
    reference: eager torch."""
    z, t = _data(c=40)
    go = _grad_output("none")
    got = _grad(_compiled(xt.cross_entropy, "inductor"), z, t, go, reduction="none")
    _same(got, _grad(F.cross_entropy, z, t, go, reduction="none"))


class _Loss(torch.nn.Module):
    def __init__(self, fn, reduction):
        super().__init__()
        self.fn, self.reduction = fn, reduction

    def forward(self, z, t):
        return self.fn(z * 1, t, reduction=self.reduction)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_exported_program_backward_with_infinite_grad_output(strict, reduction):
    z, t = _data()
    go = _grad_output(reduction)
    grads = []
    for fn in (xt.cross_entropy, F.cross_entropy):
        ep = torch.export.export(_Loss(fn, reduction), (z.clone().requires_grad_(), t),
                                 strict=strict)
        grads.append(_grad(ep.module(), z, t, go))
    _same(*grads)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_retain_graph_backward_twice_save_on_cpu_and_checkpoint(backend):
    z, t = _data()
    outs = []
    for fn in (xt.cross_entropy, F.cross_entropy):
        f = _compiled(fn, backend)
        x = z.clone().requires_grad_()
        loss = f(x * 1, t, reduction="none")
        loss.backward(_grad_output("none"), retain_graph=True)
        first = x.grad.clone()
        loss.backward(torch.ones(6))
        outs.append((first, x.grad))
        x = z.clone().requires_grad_()
        with torch.autograd.graph.save_on_cpu():
            loss = f(x * 1, t, reduction="sum")
        loss.backward(torch.tensor(INF))
        outs.append((x.grad,))
        x = z.clone().requires_grad_()
        checkpoint(lambda a, f=f: f(a * 1, t, reduction="sum"), x,
                   use_reentrant=False).backward(torch.tensor(-INF))
        outs.append((x.grad,))
    half = len(outs) // 2
    for ours, theirs in zip(outs[:half], outs[half:], strict=True):
        for got, want in zip(ours, theirs, strict=True):
            _same(got, want)


def _after_in_place_change_of_the_logits(fn, backend, leaf, go):
    z, t = _data()
    x = z.clone().requires_grad_()

    def forward(a, b):
        logits = a if leaf else a * 1.0
        return fn(logits, b), logits

    loss, logits = (_compiled(forward, backend) if backend else forward)(x, t)
    with torch.no_grad():
        logits.add_(1.0)  # an optimizer step, a later in-place op on the activation
    loss.backward(go)
    return x.grad


@pytest.mark.parametrize("leaf", [False, True], ids=["activation", "leaf"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_in_place_change_of_the_logits_then_a_finite_backward(backend, leaf):
    go = torch.tensor(1.0)
    want = _after_in_place_change_of_the_logits(F.cross_entropy, backend, leaf, go)
    got = _after_in_place_change_of_the_logits(xt.cross_entropy, backend, leaf, go)
    _same(got, want)


@pytest.mark.parametrize("leaf", [False, True], ids=["activation", "leaf"])
def test_in_place_change_of_the_logits_eager_finite_backward_is_torchs(leaf):
    go = torch.tensor(1.0)
    _same(_after_in_place_change_of_the_logits(xt.cross_entropy, None, leaf, go),
          _after_in_place_change_of_the_logits(F.cross_entropy, None, leaf, go))


def test_in_place_change_then_infinite_grad_output_names_the_feature():
    with pytest.raises((RuntimeError, ValueError), match="infinite grad_output"):
        _after_in_place_change_of_the_logits(xt.cross_entropy, None, False,
                                             torch.tensor(INF))


# the fix of H84-1 under torch.compile: the logits are not saved (torch's loss saves its
# log-probabilities, not the logits); the compiled backward scales the stored gradient


@pytest.mark.parametrize("go", [INF, -INF])
@pytest.mark.parametrize("leaf", [False, True], ids=["activation", "leaf"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_in_place_change_then_infinite_grad_output_is_torchs(backend, leaf, go):
    """The compiled backward scales the stored (forward-time) gradient, as torch's
    backward reads its saved log-probabilities: an in-place change of the logits after
    forward changes nothing, an infinite grad_output included."""
    go = torch.tensor(go)
    _same(_after_in_place_change_of_the_logits(xt.cross_entropy, backend, leaf, go),
          _after_in_place_change_of_the_logits(F.cross_entropy, None, leaf, go))


@pytest.mark.parametrize("go", [INF, -INF, 3.0])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_logits_changed_in_place_before_forward_are_not_refused(backend, go):
    """Version bumps before forward (optimizer steps on leaf logits, an in-place
    activation) are no change: torch eager's values, the recompute included."""
    z, t = _data()

    def grads(fn, compiled):
        x = z.clone().requires_grad_()
        with torch.no_grad():
            for _ in range(3):
                x.mul_(1.0)

        def loss_of(a, b):
            h = a * 1.0
            h.add_(0.0)  # an in-place op on the activation, inside the graph
            return fn(h, b)

        (_compiled(loss_of, backend) if compiled else loss_of)(x, t).backward(
            torch.tensor(go))
        return x.grad

    _same(grads(xt.cross_entropy, True), grads(F.cross_entropy, False))


def test_compiled_in_place_change_of_the_logits_keeps_the_targets_check():
    """The logits are unchecked; the target stays saved as torch saves it (H73)."""
    z, t = _data()
    x = z.clone().requires_grad_()
    loss = _compiled(xt.cross_entropy, "aot_eager")(x * 1.0, t)
    with torch.no_grad():
        t.add_(0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---- the operator itself


def _scale_args(grad, go, t, weight=None, smoothing=False, whole_rows=None):
    del weight  # stop 35: crossent::read_saved reads it, no longer this operator
    return (grad, go, t, IGNORE, smoothing, whole_rows)


def _opcheck(args):
    result = torch.library.opcheck(torch.ops.crossent.scale_stored_grad_cpu.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


_T = torch.tensor([0, IGNORE, 2, 3, 4, 1])
_GO_ON_IGNORED = torch.tensor([1.0, INF, 2, 3, 4, 5])  # opcheck compares no NaN


@pytest.mark.parametrize("case", ["bfloat16", "spatial", "empty", "probabilities_weight",
                                  "smoothing_0d", "z_loss_whole_rows"])
def test_opcheck_unusual_arguments(case):
    args = {
        "bfloat16": lambda: _scale_args(torch.rand(6, 5).bfloat16(), _GO_ON_IGNORED, _T),
        "spatial": lambda: _scale_args(torch.rand(2, 5, 3),
                                       torch.tensor([[1.0, INF, 2], [3, 4, 5]]),
                                       torch.tensor([[0, IGNORE, 1], [2, 3, 4]])),
        "empty": lambda: _scale_args(torch.rand(0, 5), torch.tensor(INF),
                                     torch.zeros(0, dtype=torch.long)),
        "probabilities_weight": lambda: _scale_args(
            torch.rand(6, 5), torch.tensor(2.0), torch.softmax(torch.randn(6, 5), 1),
            weight=torch.rand(5)),
        "smoothing_0d": lambda: _scale_args(torch.rand(6, 5), torch.tensor(-3.0), _T,
                                            smoothing=True),
        "z_loss_whole_rows": lambda: _scale_args(
            torch.rand(6, 5), _GO_ON_IGNORED, _T,
            whole_rows=torch.tensor([False, True, False, False, False, False])),
    }[case]()
    _opcheck(args)


def test_opcheck_non_contiguous_stored_gradient():
    """H84-3: the fake and the operator give the same (contiguous) layout."""
    _opcheck(_scale_args(torch.rand(5, 6).t(), _GO_ON_IGNORED, _T))


# ---- (2) set_compiled_kernel(True) under backend="auto", at the shipped thresholds


@pytest.fixture
def kernel_asked(monkeypatch):
    """The opt-in on without compiling: ``serves`` records its calls and declines."""
    asked = []

    def serves(z, grad):
        asked.append(tuple(z.shape))
        return False

    monkeypatch.setattr(_inductor, "serves", serves)
    return asked


def _route(monkeypatch, routes, asked, on, shape, dtype, prob=False, inplace=False, **kw):
    monkeypatch.setattr(_inductor, "_enabled", on)
    routes.clear()
    asked.clear()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    z = x * 1 if inplace else x
    if prob:
        t = torch.softmax(torch.randn(shape, generator=g), 1).to(dtype)
    else:
        t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    out = xt.cross_entropy(z, t, inplace_backward=inplace, **kw)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    return list(routes), len(asked)


@pytest.mark.native_dispatch
@pytest.mark.parametrize(("shape", "dtype", "on", "off"), [
    ((1024, 512), torch.float32, "rowblock", "small"),  # 2**19 logits, 512 classes
    ((8192, 64), torch.bfloat16, "rowblock", "small"),  # 2**19 logits, 64 classes
    ((8192, 64), torch.float32, "rowblock", "small"),
    ((8192, 63), torch.bfloat16, "small", "small"),  # fewer classes: the small kernel
    ((16384, 63), torch.float32, "small", "small"),
    ((8192, 64), torch.float16, "rowblock", "rowblock"),  # float16: the row-block kernel
    ((8192, 64), torch.float64, "small", "small"),  # not a dtype it takes
], ids=str)
def test_auto_routes_at_the_shipped_thresholds(monkeypatch, routes, kernel_asked, shape,
                                               dtype, on, off):
    got_on, asked_on = _route(monkeypatch, routes, kernel_asked, True, shape, dtype)
    assert got_on == [on]
    assert asked_on == (1 if on == "rowblock" and dtype != torch.float64 else 0)
    assert _route(monkeypatch, routes, kernel_asked, False, shape, dtype)[0] == [off]


@pytest.mark.native_dispatch
@pytest.mark.parametrize("kw", [{"prob": True}, {"label_smoothing": 0.1},
                                {"statistics": ("lse",)}, {"z_loss": 1e-3},
                                {"inplace": True}, {"backend": "native"}], ids=str)
def test_options_the_kernel_refuses_keep_their_routes(monkeypatch, routes, kernel_asked, kw):
    """With the opt-in on, probability targets, smoothing, statistics, z_loss,
    inplace_backward and an explicit backend route as with it off; the first three never
    ask the kernel."""
    on = _route(monkeypatch, routes, kernel_asked, True, (8192, 64), torch.float32, **kw)
    off = _route(monkeypatch, routes, kernel_asked, False, (8192, 64), torch.float32, **kw)
    assert on[0] == off[0]
    if set(kw) & {"prob", "label_smoothing", "statistics", "z_loss"}:
        assert on[1] == 0


@pytest.mark.native_dispatch
@pytest.mark.parametrize("how", ["eager", "aot_eager"])
def test_bad_environment_value_raises_naming_it(monkeypatch, how):
    """``CROSSENT_COMPILED_KERNEL=yes``: crossent's InputError naming the variable, under
    compile too, on the first call that could use the kernel (``backend="auto"``);
    ``backend="native"`` (torch's kernel) does not read it."""
    monkeypatch.setenv(_inductor.ENVIRONMENT, "yes")
    monkeypatch.setattr(_inductor, "_enabled", None)
    z = torch.randn(1024, 512, requires_grad=True)
    t = torch.randint(0, 512, (1024,))
    fn = xt.cross_entropy if how == "eager" else _compiled(xt.cross_entropy, how)
    fn(z, t, backend="native").backward()
    assert _inductor._enabled is None
    with pytest.raises(InputError, match=_inductor.ENVIRONMENT):
        fn(z, t).backward()


@pytest.mark.native_dispatch
@pytest.mark.parametrize("classes", [64, 255])
def test_spatial_logits_keep_torchs_kernel_with_the_opt_in(monkeypatch, routes,
                                                          kernel_asked, classes):
    """Spatial (N, C, d) logits past 2**19 with 64-255 classes: torch's kernel either way
    (the row-block route would transpose them to rows first, 2.7x eager's time)."""
    shape = (8, classes, 2**19 // (8 * 64))
    on = _route(monkeypatch, routes, kernel_asked, True, shape, torch.float32)
    off = _route(monkeypatch, routes, kernel_asked, False, shape, torch.float32)
    assert on == off == (["native"], 0)


@pytest.mark.native_dispatch
@pytest.mark.skipif(not _inductor.available(), reason="no C++ compiler")
@pytest.mark.timeout(300)
def test_compiled_kernel_at_the_threshold_with_infinite_grad_output(routes, compiled_calls):
    """bfloat16 8192 x 64 (2**19 logits) on the compiled kernel: torch's pattern for an
    infinite grad_output on entries that rounded to 0, values torch's float32 rounded."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(8192, 64, generator=g).bfloat16()
    t = torch.randint(0, 64, (8192,), generator=g)
    t[0], t[1], t[5] = 1, IGNORE, 7
    z[0, 3] = z[5, 2] = -90.0  # p_j ~ e^-95: under bfloat16's subnormals, not float32's
    for reduction in ("sum", "none"):
        go = torch.tensor(INF)
        if reduction == "none":
            go = torch.ones(8192)
            go[0], go[5], go[1], go[2] = INF, -INF, INF, math.nan
        got = _grad(xt.cross_entropy, z, t, go, reduction=reduction)
        want = _grad(F.cross_entropy, z, t, go, reduction=reduction)
        exact = _grad(lambda a, b, **k: F.cross_entropy(a.float(), b, **k), z, t, go,
                      reduction=reduction)
        assert want[0, 3].isinf()
        _same(got, want, exact.bfloat16(), rtol=0, atol=0)
    assert routes == ["rowblock", "rowblock"]
    assert compiled_calls == [(8192, 64), (8192, 64)]
