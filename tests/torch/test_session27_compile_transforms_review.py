"""Review H95: torch.func transforms of (and inside) torch.compile'd functions calling
crossent (commit 8adb63d, ``_custom_ops._under_func_transform``: under a transform the
call leaves the graph and runs the eager entry point).

References are torch's own ``F.cross_entropy`` / ``F.linear`` under the same transform,
in float64. Findings:

* On dynamo's ``"aot_eager"`` / ``"inductor"`` backends dynamo does not trace a frame
  called under an outer transform at all ("Unsupported functorch tracing attempt"; the
  frame runs eagerly, torch's functions too), so the new branch only serves
  ``backend="eager"`` and transforms called inside the compiled function.
* H95-1: on ``backend="eager"`` the graph break the branch makes is resumed by dynamo
  under the transform, and dynamo fails to fake a GradTrackingTensor there whenever the
  compiled function does anything before or after the crossent call (torch's
  ``F.cross_entropy`` has no graph break and works). A torch-only function with a
  ``torch.compiler.disable``'d ``F.cross_entropy`` fails the same way (torch's bug; the
  guard at the end pins that).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import crossent.torch as xt
from crossent.errors import UnsupportedError

pytestmark = pytest.mark.filterwarnings("ignore")

N, C, D = 6, 7, 3
_G = torch.Generator().manual_seed(95)
Z = torch.randn(N, C, generator=_G, dtype=torch.float64)
X = torch.randn(N, D, generator=_G, dtype=torch.float64)
W = torch.randn(C, D, generator=_G, dtype=torch.float64)
B = torch.randn(C, generator=_G, dtype=torch.float64)
CW = torch.rand(C, generator=_G, dtype=torch.float64) + 0.5
T = torch.tensor([0, 3, -100, 6, 1, 2])
T0 = T.clamp(min=0)
TOL = dict(rtol=1e-10, atol=1e-12)


def _compile(fn, backend="eager", **kw):
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, **kw)


def _ref(a, t, *, z_loss=0.0, softcap=None, reduction="mean", num_items=None, **kw):
    """torch's loss with crossent's z_loss / softcap / num_items, from torch ops."""
    if softcap is not None:
        a = softcap * torch.tanh(a / softcap)
    rows = F.cross_entropy(a, t, reduction="none", **kw)
    counted = t != kw.get("ignore_index", -100)
    if z_loss:
        rows = rows + z_loss * torch.logsumexp(a, 1) ** 2 * counted
    if reduction == "none":
        return rows
    if reduction == "sum" or num_items is not None:
        return rows.sum() if num_items is None else rows.sum() / num_items
    w = kw.get("weight")
    den = (w[t.clamp(min=0)] * counted).sum() if w is not None else counted.sum()
    return rows.sum() / den


_OPTIONS = {
    "plain": ({}, T), "smoothing": ({"label_smoothing": 0.2}, T),
    "weight": ({"weight": CW}, T), "weight_smoothing": ({"weight": CW, "label_smoothing": 0.1}, T),
    "ignore_index": ({"ignore_index": 3}, T0), "sum": ({"reduction": "sum"}, T),
    "none": ({"reduction": "none"}, T), "z_loss": ({"z_loss": 1e-2}, T),
    "softcap": ({"softcap": 2.0}, T),
    "num_items_tensor": ({"num_items": torch.tensor(4.0, dtype=torch.float64)}, T),
    "num_items_int": ({"num_items": 4}, T),
}

_TRANSFORMS = {
    "grad": lambda f, z: torch.func.grad(lambda a: f(a).sum())(z),
    "grad_aux": lambda f, z: torch.func.grad(lambda a: (f(a).sum(), a * 2), has_aux=True)(z),
    "vmap": lambda f, z: torch.func.vmap(f)(torch.stack([z, -z])),
    "vmap_in_dims_1": lambda f, z: torch.func.vmap(f, in_dims=1)(torch.stack([z, 2 * z], 1)),
    "nested_vmap": lambda f, z: torch.func.vmap(torch.func.vmap(f))(
        torch.stack([torch.stack([z, -z]), torch.stack([2 * z, z / 2])])),
    "jvp": lambda f, z: torch.func.jvp(f, (z,), (torch.cos(z),)),
    "jacrev": lambda f, z: torch.func.jacrev(f)(z),
    "jacfwd": lambda f, z: torch.func.jacfwd(f)(z),
    "hessian": lambda f, z: torch.func.hessian(lambda a: f(a).sum())(z),
    "vmap_grad": lambda f, z: torch.func.vmap(torch.func.grad(lambda a: f(a).sum()))(
        torch.stack([z, -z])),
}


# ---- transform outside the compiled function (dynamo "eager" backend: the new branch)


# (the suite's time: six of the options; the others differ from these in a constant)
@pytest.mark.parametrize("option", ["plain", "weight_smoothing", "ignore_index", "none",
                                    "softcap", "num_items_tensor"])
def test_outer_transform_options_are_torchs(option):
    kw, t = _OPTIONS[option]
    fn = _compile(lambda a: xt.cross_entropy(a, t, **kw))
    for transform in ("jacrev", "grad", "vmap", "jvp"):  # one compiled function: guards
        want = _TRANSFORMS[transform](lambda a: _ref(a, t, **kw), Z)
        torch.testing.assert_close(_TRANSFORMS[transform](fn, Z), want, **TOL)
        torch.testing.assert_close(fn(Z), _ref(Z, t, **kw), **TOL)  # plain: the operator


# ("aot_eager" does not trace under an outer transform: test_session25_scale_stored_review
# covers it)
@pytest.mark.parametrize(("backend", "transform"), [("eager", name) for name in _TRANSFORMS])
def test_every_transform_outside_and_inside_is_torchs(backend, transform):
    kw = {"weight": CW, "label_smoothing": 0.1, "reduction": "sum"}
    want = _TRANSFORMS[transform](lambda a: F.cross_entropy(a, T, **kw), Z)
    outer = _compile(lambda a: xt.cross_entropy(a, T, **kw), backend)
    torch.testing.assert_close(_TRANSFORMS[transform](outer, Z), want, **TOL)
    torch.testing.assert_close(outer(Z), F.cross_entropy(Z, T, **kw), **TOL)
    if backend == "eager" and transform in ("grad", "grad_aux", "hessian", "vmap_grad"):
        return  # inside, an op after the call under grad on "eager": H95-1 (below)
    inner = _compile(lambda z: _TRANSFORMS[transform](
        lambda a: xt.cross_entropy(a, T, **kw), z), backend)
    torch.testing.assert_close(inner(Z), want, **TOL)


def _shifted_ref(h, w, tok, **kw):
    return F.cross_entropy(F.linear(h, w)[:, :-1].reshape(-1, C), tok[:, 1:].reshape(-1), **kw)


H = torch.randn(2, 4, D, generator=_G, dtype=torch.float64)
TOK = torch.tensor([[1, 2, 3, 4], [5, 6, -100, 0]])
_HEADS = {
    "plain": (lambda x, w: xt.linear_cross_entropy(x, w, T),
              lambda x, w: F.cross_entropy(F.linear(x, w), T), (X, W)),
    "bias_weight_smoothing": (
        lambda x, w: xt.linear_cross_entropy(x, w, T, B, weight=CW, label_smoothing=0.1),
        lambda x, w: F.cross_entropy(F.linear(x, w, B), T, CW, label_smoothing=0.1), (X, W)),
    "none": (lambda x, w: xt.linear_cross_entropy(x, w, T, reduction="none"),
             lambda x, w: F.cross_entropy(F.linear(x, w), T, reduction="none"), (X, W)),
    "num_items_tensor": (
        lambda x, w: xt.linear_cross_entropy(
            x, w, T, num_items=torch.tensor(4.0, dtype=torch.float64)),
        lambda x, w: F.cross_entropy(F.linear(x, w), T, reduction="sum") / 4, (X, W)),
    "shift": (lambda h, w: xt.linear_cross_entropy(h, w, TOK, shift=True),
              lambda h, w: _shifted_ref(h, w, TOK), (H, W)),
}
_HEAD_TRANSFORMS = {
    "grad_argnums": lambda f, a: torch.func.grad(lambda *q: f(*q).sum(), argnums=(0, 1))(*a),
    "grad_aux": lambda f, a: torch.func.grad(
        lambda *q: (f(*q).sum(), q[0] * 2), argnums=1, has_aux=True)(*a),
    "vmap_weight_only": lambda f, a: torch.func.vmap(f, in_dims=(None, 0))(
        a[0], torch.stack([a[1], 2 * a[1]])),
    "jvp": lambda f, a: torch.func.jvp(f, a, tuple(torch.cos(q) for q in a)),
    "jacrev": lambda f, a: torch.func.jacrev(f, argnums=(0, 1))(*a),
    "hessian_weight": lambda f, a: torch.func.hessian(lambda w: f(a[0], w).sum())(a[1]),
}


# every transform on the heads of most options and of 3-d input; the others (their options
# reach the same eager entry point under a transform) take two, for suite time
_FEW_TRANSFORMS = {"plain": ("grad_argnums", "jacrev"), "none": ("jvp", "jacrev"),
                   "num_items_tensor": ("grad_aux", "hessian_weight")}


@pytest.mark.parametrize("head", list(_HEADS))
def test_outer_transform_of_the_linear_head_is_torchs(head):
    ours, ref, args = _HEADS[head]
    for name in _FEW_TRANSFORMS.get(head, _HEAD_TRANSFORMS):  # a fresh compile each: H95-2
        transform = _HEAD_TRANSFORMS[name]
        fn = _compile(ours)
        torch.testing.assert_close(transform(fn, args), transform(ref, args), **TOL)
        torch.testing.assert_close(fn(*args), ref(*args), **TOL)


# ---- modules through functional_call, statistics, K-dim, probability targets


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_functional_call_of_the_modules_is_torchs(backend):
    head = xt.LinearCrossEntropyLoss(D, C, bias=True, label_smoothing=0.1, dtype=torch.float64)
    params = {k: v.detach().clone() for k, v in head.named_parameters()}

    def ref(p, x):
        return F.cross_entropy(F.linear(x, p["linear.weight"], p["linear.bias"]), T,
                               label_smoothing=0.1)

    outer = _compile(lambda p, x: torch.func.functional_call(head, p, (x, T)), backend)
    torch.testing.assert_close(torch.func.grad(outer)(params, X),
                               torch.func.grad(ref)(params, X), **TOL)
    xs = torch.stack([X, -X])
    torch.testing.assert_close(torch.func.vmap(outer, in_dims=(None, 0))(params, xs),
                               torch.func.vmap(ref, in_dims=(None, 0))(params, xs), **TOL)
    inner = _compile(lambda p, x: torch.func.grad(
        lambda q: torch.func.functional_call(head, q, (x, T)))(p), backend)
    torch.testing.assert_close(inner(params, X), torch.func.grad(ref)(params, X), **TOL)
    loss = xt.CrossEntropyLoss(weight=CW, reduction="sum")
    fn = _compile(lambda a: torch.func.functional_call(loss, {}, (a, T)), backend)
    torch.testing.assert_close(
        torch.func.jacrev(fn)(Z),
        torch.func.jacrev(lambda a: F.cross_entropy(a, T, CW, reduction="sum"))(Z), **TOL)


@pytest.mark.parametrize("backend", ["eager"])
def test_statistics_k_dim_and_probability_targets_under_transforms(backend):
    counted = T != -100
    fn = _compile(lambda a: (lambda r: (r[0], r[1].lse))(
        xt.cross_entropy(a, T, statistics=("lse",))), backend)
    g, lse = torch.func.grad(fn, has_aux=True)(Z)
    torch.testing.assert_close(g, torch.func.grad(lambda a: F.cross_entropy(a, T))(Z), **TOL)
    torch.testing.assert_close(lse[counted], torch.logsumexp(Z, 1)[counted], **TOL)
    batch = torch.stack([Z, 2 * Z])
    _, lses = torch.func.vmap(fn)(batch)
    torch.testing.assert_close(lses[:, counted], torch.logsumexp(batch, 2)[:, counted], **TOL)
    _, lse = fn(Z)
    torch.testing.assert_close(lse[counted], torch.logsumexp(Z, 1)[counted], **TOL)

    zk = torch.randn(2, C, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tk = torch.tensor([[0, 3, -100], [6, 1, 2]])

    def ref_k(a):
        return F.cross_entropy(a, tk, label_smoothing=0.1, reduction="none")

    fk = _compile(lambda a: xt.cross_entropy(a, tk, label_smoothing=0.1, reduction="none"),
                  backend)
    torch.testing.assert_close(torch.func.jacrev(fk)(zk), torch.func.jacrev(ref_k)(zk), **TOL)
    zks = torch.stack([zk, -zk], 2)
    torch.testing.assert_close(torch.func.vmap(fk, in_dims=2)(zks),
                               torch.func.vmap(ref_k, in_dims=2)(zks), **TOL)

    probs = torch.softmax(torch.randn(N, C, generator=torch.Generator().manual_seed(2),
                                      dtype=torch.float64), 1)

    def ref_p(a, p):
        return F.cross_entropy(a, p, label_smoothing=0.1)

    fp = _compile(lambda a, p: xt.cross_entropy(a, p, label_smoothing=0.1), backend)
    torch.testing.assert_close(torch.func.grad(fp, argnums=(0, 1))(Z, probs),
                               torch.func.grad(ref_p, argnums=(0, 1))(Z, probs), **TOL)
    tangents = (Z.cos(), probs.sin())
    torch.testing.assert_close(torch.func.jvp(fp, (Z, probs), tangents),
                               torch.func.jvp(ref_p, (Z, probs), tangents), **TOL)
    targets = torch.stack([T, T.flip(0)])
    ft = _compile(lambda a, y: xt.cross_entropy(a, y), backend)
    torch.testing.assert_close(
        torch.func.vmap(ft, in_dims=(None, 0))(Z, targets),
        torch.func.vmap(lambda a, y: F.cross_entropy(a, y), in_dims=(None, 0))(Z, targets))


def test_vmap_over_num_items_is_refused_as_eagerly():
    """A batched num_items: eager crossent refuses it (documented); compiled, the same."""
    counts = torch.tensor([2.0, 5.0], dtype=torch.float64)
    with pytest.raises(UnsupportedError, match="num_items"):
        torch.func.vmap(lambda a, n: xt.cross_entropy(a, T, num_items=n),
                        in_dims=(None, 0))(Z, counts)
    fn = _compile(lambda a, n: xt.cross_entropy(a, T, num_items=n))
    with pytest.raises(Exception, match="num_items"):
        torch.func.vmap(fn, in_dims=(None, 0))(Z, counts)


def test_mixed_plain_and_transformed_calls_in_one_compiled_function():
    """One traced frame: a plain call (the operator), one under an inner grad (eager
    entry point), a plain call again; the constant read must not leak between them."""
    def make(ce):
        return lambda a: (ce(a, T) + torch.func.grad(lambda b: ce(b * 2, T))(a).pow(2).sum()
                          + ce(a * 3, T))
    fn = _compile(make(xt.cross_entropy), "aot_eager")
    torch.testing.assert_close(fn(Z), make(F.cross_entropy)(Z), **TOL)
    torch.testing.assert_close(torch.func.grad(fn)(Z),
                               torch.func.grad(make(F.cross_entropy))(Z), **TOL)
    explained = torch._dynamo.explain(make(xt.cross_entropy))(Z)
    ops = [n.target for g in explained.graphs for n in g.graph.nodes
           if n.op == "call_function"]
    assert sum(o is torch.ops.crossent.cross_entropy_fwd for o in ops) == 2


# ---- the plain compiled path and dynamo's guards


def test_no_transform_keeps_the_operator_without_a_graph_break():
    for fn, args in [(lambda a: xt.cross_entropy(a, T, label_smoothing=0.1), (Z,)),
                     (lambda x, w: xt.linear_cross_entropy(x, w, T), (X, W))]:
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(*args)
        assert explained.graph_break_count == 0
        targets = {n.target for g in explained.graphs for n in g.graph.nodes}
        assert targets & {torch.ops.crossent.cross_entropy_fwd,
                          torch.ops.crossent.linear_cross_entropy_fwd}


def test_guards_separate_transformed_and_plain_calls_in_either_order():
    graphs = []

    def recording(gm, example_inputs):
        graphs.append({n.target for n in gm.graph.nodes})
        return gm.forward

    want = {"plain": lambda: F.cross_entropy(Z, T),
            "grad": lambda: torch.func.grad(lambda a: F.cross_entropy(a, T))(Z),
            "vmap": lambda: torch.func.vmap(lambda a: F.cross_entropy(a, T))(
                torch.stack([Z, -Z])),
            "jvp": lambda: torch.func.jvp(lambda a: F.cross_entropy(a, T), (Z,), (Z.cos(),))}
    for order in (["plain", "grad", "plain", "vmap", "plain", "jvp", "plain"],
                  ["grad", "plain", "vmap", "plain", "grad"]):
        torch._dynamo.reset()
        counters.clear()
        graphs.clear()
        fn = torch.compile(lambda a: xt.cross_entropy(a, T), backend=recording)
        got = {"plain": lambda f=fn: f(Z), "grad": lambda f=fn: torch.func.grad(f)(Z),
               "vmap": lambda f=fn: torch.func.vmap(f)(torch.stack([Z, -Z])),
               "jvp": lambda f=fn: torch.func.jvp(f, (Z,), (Z.cos(),))}
        for step in order:
            torch.testing.assert_close(got[step](), want[step](), rtol=1e-12, atol=1e-12)
        # the plain call compiled once, into the operator; the transformed ones none
        assert counters["stats"]["calls_captured"] >= 1


def test_fullgraph_with_a_transform_names_crossent_on_the_eager_backend():
    fn = _compile(lambda a: xt.cross_entropy(a, T), fullgraph=True)
    torch.testing.assert_close(fn(Z), F.cross_entropy(Z, T))
    for run in (lambda: torch.func.grad(fn)(Z), lambda: torch.func.vmap(fn)(torch.stack([Z, Z]))):
        with pytest.raises(Exception, match=r"torch\.func transform") as info:
            run()
        assert "crossent.torch.cross_entropy" in str(info.value)


def test_fullgraph_on_aot_eager_refuses_any_outer_transform_as_torch_does():
    """Not crossent's text: dynamo refuses the frame before crossent runs, as for torch's
    F.cross_entropy (the docs' 'a reason naming crossent' holds on backend='eager')."""
    for ce in (F.cross_entropy, xt.cross_entropy):
        fn = _compile(lambda a, ce=ce: ce(a, T), "aot_eager", fullgraph=True)
        with pytest.raises(Exception, match="functorch"):
            torch.func.grad(fn)(Z)


def test_export_keeps_the_operator():
    class Loss(torch.nn.Module):
        def forward(self, a, t):
            return xt.cross_entropy(a, t, label_smoothing=0.1)

    exported = torch.export.export(Loss(), (Z, T))
    assert any(n.target is torch.ops.crossent.cross_entropy_fwd.default
               for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(Z, T),
                               F.cross_entropy(Z, T, label_smoothing=0.1), **TOL)


def test_inductor_outer_grad_once():
    fn = _compile(lambda x, w: xt.linear_cross_entropy(x, w, T, label_smoothing=0.1),
                  "inductor")
    want = torch.func.grad(lambda x, w: F.cross_entropy(F.linear(x, w), T,
                                                        label_smoothing=0.1),
                           argnums=(0, 1))(X, W)
    torch.testing.assert_close(torch.func.grad(fn, argnums=(0, 1))(X, W), want, **TOL)


# ---- H95-1: backend="eager", anything besides the call under an outer grad / jacrev

_AROUND = {
    "after": lambda ce: (lambda a: ce(a, T) * 2),
    "before": lambda ce: (lambda a: ce(torch.tanh(a), T)),
    "beside": lambda ce: (lambda a: ce(a, T) + a.sum()),
}


@pytest.mark.xfail(strict=True, reason=(
    "documented limitation (docs/guarantees.md; was BUG H95-1, torch's own graph-break "
    "bug, a loud error): _custom_ops.compilable entry (_under_func_transform graph break): "
    "torch.func.grad/jacrev of a torch.compile(backend='eager') function doing anything "
    "before/after the crossent call raises dynamo's AssertionError 'False != True' "
    "(meta_utils is_leaf, faking a GradTrackingTensor in the resumed frame); torch's "
    "F.cross_entropy there has no graph break and gives its gradient"))
@pytest.mark.parametrize(("around", "transform"), [("after", "grad"), ("before", "jacrev")])
def test_outer_grad_with_other_ops_on_the_eager_backend(around, transform):
    apply = getattr(torch.func, transform)
    want = apply(_AROUND[around](F.cross_entropy))(Z)
    fn = _compile(_AROUND[around](xt.cross_entropy))
    torch.testing.assert_close(apply(fn)(Z), want, **TOL)


@pytest.mark.xfail(strict=True, reason=(
    "documented limitation (was BUG H95-1, inner form): "
    "torch.func.grad(lambda a: xt.cross_entropy(a, t).sum()) "
    "called inside a torch.compile(backend='eager') function raises dynamo's "
    "AssertionError 'False != True'; torch's F.cross_entropy gives its gradient"))
def test_inner_grad_with_an_op_after_the_call_on_the_eager_backend():
    def make(ce):
        return lambda z: torch.func.grad(lambda a: ce(a, T, reduction="sum").sum())(z)
    torch.testing.assert_close(_compile(make(xt.cross_entropy))(Z), make(F.cross_entropy)(Z),
                               **TOL)


def test_h95_1_is_torchs_own_graph_break_bug():
    """The cause: any graph break there (torch-only: a compiler.disable'd F.cross_entropy);
    torch's plain function compiles without one. The other transforms and backends pass."""
    disabled = torch.compiler.disable(lambda a, t: F.cross_entropy(a, t))
    with pytest.raises(AssertionError, match="False != True"):
        torch.func.grad(_compile(_AROUND["after"](disabled)))(Z)
    want = torch.func.grad(_AROUND["after"](F.cross_entropy))(Z)
    torch.testing.assert_close(torch.func.grad(_compile(_AROUND["after"](F.cross_entropy)))(Z),
                               want, **TOL)
    for backend in ("aot_eager",):
        fn = _compile(_AROUND["after"](xt.cross_entropy), backend)
        torch.testing.assert_close(torch.func.grad(fn)(Z), want, **TOL)
    batch = torch.stack([Z, -Z])
    fn = _compile(_AROUND["after"](xt.cross_entropy))
    torch.testing.assert_close(torch.func.vmap(fn)(batch),
                               torch.func.vmap(_AROUND["after"](F.cross_entropy))(batch), **TOL)


def test_inner_grad_of_grad_on_the_eager_backend_fails_as_torchs_graph_break():
    """grad(grad) inside a backend='eager' compiled function: dynamo's same failure with
    a torch-only disabled function; the undisabled F.cross_entropy works."""
    def make(ce):
        return lambda z: torch.func.grad(lambda a: torch.func.grad(
            lambda b: ce(b, T))(a).pow(2).sum())(z)
    disabled = torch.compiler.disable(lambda a, t: F.cross_entropy(a, t))
    for ce in (disabled, xt.cross_entropy):
        with pytest.raises(AssertionError, match="False != True"):
            _compile(make(ce))(Z)
    torch.testing.assert_close(_compile(make(F.cross_entropy))(Z), make(F.cross_entropy)(Z))


@pytest.mark.xfail(strict=True, reason=(
    "documented limitation (docs/guarantees.md; was BUG H95-2, a loud error): "
    "_custom_ops._under_func_transform (assume_constant_result) / dynamo guards: "
    "one torch.compile(backend='eager') function called under torch.func.jvp, then "
    "plainly, then under torch.func.jacrev: the jacrev recompile traces the custom operator "
    "on a GradTrackingTensor and raises TorchRuntimeError 'must override the setup_context "
    "staticmethod' (H86-1's error); jacrev alone, or after the plain call only, gives "
    "torch's values"))
def test_jvp_then_plain_then_jacrev_on_one_compiled_function():
    fn = _compile(lambda a: xt.cross_entropy(a, T, reduction="sum"))

    def ref(a):
        return F.cross_entropy(a, T, reduction="sum")

    torch.testing.assert_close(torch.func.jvp(fn, (Z,), (Z.cos(),)),
                               torch.func.jvp(ref, (Z,), (Z.cos(),)), **TOL)
    torch.testing.assert_close(fn(Z), ref(Z), **TOL)
    torch.testing.assert_close(torch.func.jacrev(fn)(Z), torch.func.jacrev(ref)(Z), **TOL)


def test_h95_2_neighbours_pass():
    """The same three calls in other orders (fresh compiles) give torch's values."""
    def ref(a):
        return F.cross_entropy(a, T, reduction="sum")
    steps = {"plain": lambda f: f(Z), "jvp": lambda f: torch.func.jvp(f, (Z,), (Z.cos(),)),
             "jacrev": lambda f: torch.func.jacrev(f)(Z)}
    for order in (["plain", "jacrev", "plain"], ["jvp", "jacrev"], ["jacrev", "plain", "jvp"]):
        fn = _compile(lambda a: xt.cross_entropy(a, T, reduction="sum"))
        for step in order:
            torch.testing.assert_close(steps[step](fn), steps[step](ref), **TOL)
