"""Review H79 of 6e8d375 (CPU probability targets on torch's kernel after a -inf check:
``_backends.wants_neg_inf_check``, ``Call.no_neg_inf``) and of 226821f's
``_rules.watch_inputs`` (the identity node that checks the caller's target/weight
versions where a converted copy reached torch's kernel or the small kernel).

References are torch itself (float64 where values are compared). Bugs are tests written
as they should pass, marked ``xfail(strict=True, reason="BUG H79: ...")``; the rest are
regression guards. The dispatch thresholds are crossent's shipped ones."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt

pytestmark = pytest.mark.native_dispatch  # the dispatch as shipped

INF = float("inf")


def _probs(shape, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), 1).to(dtype)


def _logits(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


ABOVE = (25000, 30)  # 750000 logits > 2^19, 30 classes < 64: the few-classes route

OPTION_CASES = [
    ("mean", {}),
    ("sum", {"reduction": "sum"}),
    ("none", {"reduction": "none"}),
    ("label smoothing", {"label_smoothing": 0.2}),
    ("num_items", {"reduction": "sum", "num_items": 7}),
    ("weight", {"weight": True}),
    ("weight, smoothing, none", {"weight": True, "label_smoothing": 0.1, "reduction": "none"}),
]


def _kwargs(opts, classes, dtype=torch.float64, weight_grad=False):
    kw = {k: v for k, v in opts.items() if k != "weight"}
    if opts.get("weight"):
        kw["weight"] = torch.linspace(0.5, 1.5, classes, dtype=dtype).requires_grad_(
            weight_grad)
    return kw


SHAPE_CASES = [(f"{name}-{what}", shape, opts)
               for name, shape in (("small", (9, 7)), ("spatial", (2, 5, 3, 4)))
               for what, opts in OPTION_CASES] + [
    (f"few classes above 2^19-{what}", ABOVE, opts) for what, opts in OPTION_CASES
    if what in ("mean", "weight, smoothing, none")]


@pytest.mark.parametrize(("shape", "opts"), [c[1:] for c in SHAPE_CASES],
                         ids=[c[0] for c in SHAPE_CASES])
def test_native_probability_route_gives_torchs_values_and_all_gradients(routes, shape, opts):
    z, t = _logits(shape), _probs(shape)
    a, ta = z.clone().requires_grad_(), t.clone().requires_grad_()
    kw = _kwargs(opts, shape[1], torch.float32, weight_grad=True)
    loss = xt.cross_entropy(a, ta, **kw)
    assert routes == ["native"]
    num = kw.pop("num_items", None)
    r, tr = z.double().requires_grad_(), t.double().requires_grad_()
    kr = _kwargs(opts, shape[1], torch.float64, weight_grad=True)
    kr.pop("num_items", None)
    want = F.cross_entropy(r, tr, **kr)
    if num is not None:
        want = want / num
    g = torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape)
    loss.backward(g)
    want.backward(g.double())
    tol = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(loss.double(), want, **tol)
    torch.testing.assert_close(a.grad.double(), r.grad, **tol)
    torch.testing.assert_close(ta.grad.double(), tr.grad, **tol)
    if "weight" in kw:
        torch.testing.assert_close(kw["weight"].grad.double(), kr["weight"].grad, **tol)


@pytest.mark.parametrize(("zd", "td"), [(torch.float32, torch.float64),
                                        (torch.float64, torch.float32),
                                        (torch.bfloat16, torch.float32),
                                        (torch.float32, torch.bfloat16),
                                        (torch.float16, torch.float16),
                                        (torch.bfloat16, torch.bfloat16)])
def test_mixed_dtypes_promote_as_torch(routes, zd, td):
    z, t = _logits((8, 5), dtype=zd), _probs((8, 5), dtype=td)
    a = z.clone().requires_grad_()
    loss = xt.cross_entropy(a, t)
    assert routes == ["native"]
    want_dtype = F.cross_entropy(z, t).dtype  # torch's promotion
    assert loss.dtype == want_dtype
    loss.backward()
    r = z.double().requires_grad_()
    want = F.cross_entropy(r, t.double())
    want.backward()
    low = torch.float16 in (zd, td) or torch.bfloat16 in (zd, td)
    tol = {"rtol": 2e-2, "atol": 2e-3} if low else {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(loss.double(), want, **tol)
    assert a.grad.dtype == zd
    torch.testing.assert_close(a.grad.double(), r.grad, **tol)


def test_loss_dtype_on_the_native_route(routes):
    z, t = _logits((8, 5), dtype=torch.bfloat16), _probs((8, 5), dtype=torch.bfloat16)
    loss = xt.cross_entropy(z, t, loss_dtype=torch.float32)
    assert routes == ["native"] and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), F.cross_entropy(z.double(), t.double()),
                               rtol=1e-2, atol=1e-3)


def test_autocast_as_torch(routes):
    z, t = _logits((8, 5)), _probs((8, 5))
    w = torch.linspace(0.5, 1.5, 5).bfloat16()
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = xt.cross_entropy(a, t, weight=w)
        want = F.cross_entropy(b, t, weight=w)
    assert routes == ["native"] and got.dtype == want.dtype
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("bad", [float("nan"), INF], ids=["nan", "+inf"])
def test_nan_and_plus_inf_logits_are_torchs(routes, bad):
    z, t = _logits((6, 5)), _probs((6, 5))
    z[1, 2] = bad
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = xt.cross_entropy(a, t, reduction="none")
    want = F.cross_entropy(b, t, reduction="none")
    assert routes == ["native"]
    torch.testing.assert_close(got, want, equal_nan=True)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 5), (2, 5, 3, 2)], ids=["rows", "spatial"])
def test_minus_inf_in_one_row_with_positive_target_is_torchs_inf(routes, dtype, shape):
    # -inf found (any dtype): the fused kernel; a positive target there is torch's inf,
    # other rows torch's numbers, the logits' gradient torch's (finite)
    z, t = _logits(shape, dtype=dtype), _probs(shape, dtype=dtype)
    z[(0, 1) + (0,) * (len(shape) - 2)] = -INF
    a = z.clone().requires_grad_()
    got = xt.cross_entropy(a, t, reduction="none")
    assert routes == ["rowblock"]
    r = z.double().requires_grad_()
    want = F.cross_entropy(r, t.double(), reduction="none")
    tol = {"rtol": 2e-2, "atol": 2e-3} if dtype != torch.float32 else {}
    torch.testing.assert_close(got.double(), want, **tol)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(a.grad.double(), r.grad, **tol)


def test_minus_inf_written_after_forward_is_torchs_gradient(routes):
    z, t = _logits((6, 5)), _probs((6, 5))
    grads = []
    for fn in (xt.cross_entropy, F.cross_entropy):
        a = z.clone().requires_grad_()
        b = a * 1
        loss = fn(b, t)
        with torch.no_grad():
            b[0, 0] = -INF  # torch's log_softmax saved its output: no error, same gradient
        loss.backward()
        grads.append(a.grad)
    assert routes == ["native"]
    torch.testing.assert_close(grads[0], grads[1])


def test_double_backward_and_batched_grads_on_the_native_route(routes):
    z, t = _logits((6, 5), dtype=torch.float64), _probs((6, 5), dtype=torch.float64)
    out = []
    for fn in (xt.cross_entropy, F.cross_entropy):
        a, ta = z.clone().requires_grad_(), t.clone().requires_grad_()
        loss = fn(a, ta, reduction="none")
        (g,) = torch.autograd.grad(loss.sum(), a, create_graph=True, retain_graph=True)
        h = torch.autograd.grad((g * g).sum(), (a, ta), retain_graph=True)
        (gb,) = torch.autograd.grad(loss, a, torch.eye(6, dtype=torch.float64),
                                    is_grads_batched=True)
        out.append((*h, gb))
    assert routes == ["native"]
    for got, want in zip(*out, strict=True):
        torch.testing.assert_close(got, want)


def test_transforms_and_fake_tensors_read_no_value(monkeypatch, routes):
    z, t = _logits((6, 5)), _probs((6, 5))
    from crossent.torch import _backends

    reads = []  # calls where the entry would read the logits for a -inf
    real = _backends.wants_neg_inf_check
    monkeypatch.setattr(_backends, "wants_neg_inf_check",
                        lambda *a: real(*a) and not reads.append(1))
    got = torch.func.grad(lambda x: xt.cross_entropy(x, t))(z)
    torch.testing.assert_close(got, torch.func.grad(lambda x: F.cross_entropy(x, t))(z))
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    with FakeTensorMode():
        fz = torch.randn(6, 5, requires_grad=True)
        xt.cross_entropy(fz, torch.softmax(torch.randn(6, 5), 1)).backward()
    graph = make_fx(lambda x, y: xt.cross_entropy(x, y), tracing_mode="fake")(z, t)
    assert not reads
    torch.testing.assert_close(graph(z, t), F.cross_entropy(z, t))


def test_inplace_backward_few_classes_keeps_the_fused_kernel_with_torchs_numbers(routes):
    z, t = _logits(ABOVE), _probs(ABOVE)
    a = z.clone().requires_grad_()
    xt.cross_entropy(a * 1, t, inplace_backward=True).backward()
    assert routes == ["rowblock"]
    r = z.double().requires_grad_()
    F.cross_entropy(r, t.double()).backward()
    torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-5, atol=1e-9)


def test_threads_each_see_their_own_minus_inf():
    z, t = _logits((6, 5)), _probs((6, 5))
    zi = z.clone()
    zi[0, 0] = -INF
    ti = t.clone()
    ti[0, 0] = 0.0
    want_plain = F.cross_entropy(z.double(), t.double())
    want_inf = F.cross_entropy(zi.double().masked_fill(zi == -INF, -1e300), ti.double())
    errors = []

    def work(k):
        for _ in range(20):
            if k % 2:
                ok = torch.allclose(xt.cross_entropy(zi, ti).double(), want_inf)
            else:
                ok = torch.allclose(xt.cross_entropy(z, t).double(), want_plain)
            if not ok:
                errors.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


# ---- 226821f: watch_inputs ----

def _inplace_then_backward(fn, target, change, weight=None, hooks=False, autocast=False):
    z = _logits((6, 5))
    a = z.clone().requires_grad_()
    with torch.autograd.graph.save_on_cpu() if hooks else _null():
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else _null():
            loss = fn(a, target, weight=weight)
    change()
    try:
        loss.backward()
    except RuntimeError:
        return "raises"
    return "ok"


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _uint8_target():
    return torch.tensor([0, 4, 2, 1, 3, 0], dtype=torch.uint8)


WATCH_CASES = [
    # (what, make target, make weight, bump target (else weight), autocast)
    ("bf16 prob target", lambda: _probs((6, 5), dtype=torch.bfloat16), None, True, False),
    ("uint8 target", _uint8_target, None, True, False),
    ("bf16 weight, prob target", lambda: _probs((6, 5)),
     lambda: torch.linspace(0.5, 1.5, 5).bfloat16(), False, False),
    ("bf16 weight under autocast", lambda: _probs((6, 5)),
     lambda: torch.linspace(0.5, 1.5, 5).bfloat16(), False, True),
    ("f32 weight under autocast", _uint8_target,
     lambda: torch.linspace(0.5, 1.5, 5), False, True),
]


@pytest.mark.parametrize(("what", "make_t", "make_w", "bump_target", "autocast"), WATCH_CASES,
                         ids=[c[0] for c in WATCH_CASES])
def test_in_place_change_raises_exactly_where_torch_raises(what, make_t, make_w, bump_target,
                                                           autocast):
    results = []
    for fn in (xt.cross_entropy, F.cross_entropy):
        t, w = make_t(), None if make_w is None else make_w()
        bumped = t if bump_target else w
        results.append(_inplace_then_backward(fn, t, lambda b=bumped: b.add_(0), weight=w,
                                              autocast=autocast))
    assert results[0] == results[1]


@pytest.mark.parametrize("make_t", [lambda: _probs((6, 5), dtype=torch.bfloat16),
                                    _uint8_target], ids=["bf16 probabilities", "uint8"])
def test_save_on_cpu_changed_target_does_not_raise_as_torch(routes, make_t):
    results = []
    for fn in (xt.cross_entropy, F.cross_entropy):
        t = make_t()
        results.append(_inplace_then_backward(fn, t, lambda t=t: t.add_(0), hooks=True))
    assert routes == ["native"]
    assert results == ["ok", "ok"]  # torch: no version check under hooks


def test_watch_inputs_keeps_autograd_features(routes):
    z = _logits((6, 5), dtype=torch.float64)
    t = _probs((6, 5), dtype=torch.bfloat16)  # converted: watched
    out = []
    for fn in (xt.cross_entropy, F.cross_entropy):
        a = z.clone().requires_grad_()
        loss = fn(a, t.double() if fn is F.cross_entropy else t, reduction="none")
        (g,) = torch.autograd.grad(loss.sum(), a, create_graph=True, retain_graph=True)
        (h,) = torch.autograd.grad((g * g).sum(), a, retain_graph=True)
        (gb,) = torch.autograd.grad(loss, a, torch.eye(6, dtype=torch.float64),
                                    is_grads_batched=True, retain_graph=True)
        loss.sum().backward(retain_graph=True)
        loss.sum().backward()  # twice
        with torch.autograd.graph.save_on_cpu():
            b = z.clone().requires_grad_()
            fn(b, t.double() if fn is F.cross_entropy else t).backward()
        out.append((g, h, gb, a.grad, b.grad))
    assert routes == ["native", "native"]
    for got, want in zip(*out, strict=True):
        torch.testing.assert_close(got, want)


def test_compiled_call_with_uint8_target_is_torchs():
    z = _logits((6, 5))
    t = _uint8_target()
    compiled = torch.compile(lambda x, y: xt.cross_entropy(x, y), backend="aot_eager")
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = compiled(a, t)
    want = F.cross_entropy(b, t.long())
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(a.grad, b.grad)
    a2 = z.clone().requires_grad_()
    loss = compiled(a2, t)
    t.add_(0)
    with pytest.raises(RuntimeError):  # torch raises for its uint8 target too
        loss.backward()
