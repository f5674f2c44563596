"""Adversarial review H82 (session 24) of be27cc6 and 06cd2eb: the CPU small-batch kernel
(``crossent.torch._small``) on bfloat16 logits, its ``N x C`` buffers from crossent's pool
(``_buffers``), float32 at any size (``_backends.SMALL_MAX_LOGITS_FLOAT32``), log_softmax of
the underflowing rows only, probability targets of 64-127 classes on torch's kernel after
the ``-inf`` check (``_backends.has_neg_inf``).

References are independent of crossent: torch's ``F.cross_entropy`` in float64, in float32
on the upcast bfloat16 logits (rounded to bfloat16 once), or in the same dtype; torch doing
the same hook / accumulation / retained-graph sequence. Every small-kernel test asserts the
route. The one bug it found (H82-1: an infinite ``grad_output`` gave NaN where the stored
gradient had rounded to 0 and torch's is +-inf) was fixed at stop 33
(``_rules.infinite_on_cpu``); its tests are plain tests now.
"""

from __future__ import annotations

import contextlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.torch import _backends, _buffers, _small

pytestmark = [pytest.mark.native_dispatch, pytest.mark.timeout(120)]

BF16 = torch.bfloat16
NAN, INF = math.nan, math.inf
REDUCTIONS = ["mean", "sum", "none"]


def _name(value):
    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else None


@pytest.fixture
def small(monkeypatch):
    """Small shapes take the small kernel; returns the dtypes of the calls that reached it
    (any thread)."""
    monkeypatch.setattr(_backends, "SMALL_MIN_LOGITS", 1)
    calls: list[torch.dtype] = []
    real = _small._SmallCrossEntropy.apply

    def spy(*args):
        calls.append(args[0].dtype)
        return real(*args)

    monkeypatch.setattr(_small._SmallCrossEntropy, "apply", spy)
    return calls


@contextlib.contextmanager
def taken(calls, expected=True):
    before = len(calls)
    yield
    assert (len(calls) > before) == expected, (
        f"the small kernel was {'not ' * expected}taken")


def _ones_or(go, loss):
    return torch.ones_like(loss) if go is None else go


def _grad(fn, z, t, go=None, **kw):
    leaf = z.detach().clone().requires_grad_()
    loss = fn(leaf, t, **kw)
    loss.backward(_ones_or(go, loss))
    return loss.detach(), leaf.grad


def _reference(z, t, go=None, **kw):
    """torch's loss and gradient: float32 on the upcast logits for bfloat16 (each rounded
    to bfloat16 once), else in the logits' own dtype."""
    low = z.dtype == BF16
    leaf = z.detach().clone().requires_grad_()
    loss = F.cross_entropy(leaf.float() if low else leaf, t.long(), **kw)
    loss.backward(_ones_or(None if go is None else go.to(loss.dtype), loss))
    return (loss.detach().to(z.dtype), leaf.grad) if low else (loss.detach(), leaf.grad)


def _tol(dtype, scaled=False):
    if dtype == BF16:  # one bfloat16 ulp; two where a grad_output scales the stored one
        return {"rtol": 2**-6 if scaled else 2**-7, "atol": 1e-30}
    return {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-12,
                                                                         "atol": 1e-300}


def _close(got, want, **tol):
    torch.testing.assert_close(got, want, equal_nan=True, **tol)


# ---- BUG H82-1: an infinite grad_output meets a stored entry rounded to 0


def _tiny_probability_case(dtype):
    """Rows where one softmax entry is a float32 (float64) subnormal, nonzero in torch's
    gradient but 0 once the kernel stores it: bfloat16 (smallest subnormal 2**-133) drops
    every entry under ~4.6e-41, a "mean" gradient in float32/float64 drops p / N under
    their smallest subnormal."""
    if dtype == BF16:
        z = torch.tensor([[0.0, -95.0, 1.0, 2.0], [0.0, 0.0, 0.0, -96.0],
                          [3.0, 1.0, -99.0, 0.5]], dtype=BF16)
        return z, torch.tensor([0, 2, 1])
    gap = 101.0 if dtype == torch.float32 else 742.0
    z = torch.zeros(1000, 5, dtype=dtype)
    z[:, 1] = -gap
    return z, torch.zeros(1000, dtype=torch.long)


@pytest.mark.parametrize("dtype, reduction", [(BF16, "mean"), (BF16, "sum"), (BF16, "none"),
                                              (torch.float32, "mean"),
                                              (torch.float64, "mean")], ids=[
    "bfloat16-mean", "bfloat16-sum", "bfloat16-none", "float32-mean", "float64-mean"])
def test_infinite_grad_output_at_a_tiny_probability_is_torchs_inf(small, dtype, reduction):
    z, t = _tiny_probability_case(dtype)
    shape = (z.shape[0],) if reduction == "none" else ()
    go = torch.full(shape, INF, dtype=dtype)
    with taken(small):
        _, grad = _grad(xt.cross_entropy, z, t, go, reduction=reduction)
    _, want = _reference(z, t, go, reduction=reduction)
    assert torch.isinf(want).any()  # the entries at stake: torch's p_j * inf
    assert torch.equal(grad.isnan(), want.to(dtype).isnan())
    _close(grad, want.to(dtype), rtol=0, atol=0)


# ---- bfloat16: options the existing tests do not combine


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32, torch.uint8], ids=_name)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_bfloat16_num_items_loss_dtype_narrow_targets_layouts(small, reduction, target_dtype,
                                                              layout):
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(9, 12, generator=g, dtype=torch.float64) * 4).to(BF16)
    if layout == "transposed":
        z = z.t().contiguous().t()
        assert not z.is_contiguous()
    t = torch.randint(0, 12, (9,), generator=g)
    ignore = 200 if target_dtype == torch.uint8 else -100
    t[[1, 5]] = ignore
    t = t.to(target_dtype)
    items = [None] if reduction == "none" else [None, 3, 7.5, torch.tensor(11)]
    for num_items in items:
        for loss_dtype in (None, torch.float32, torch.float64):
            kw = {"reduction": reduction, "ignore_index": ignore}
            if num_items is not None:
                kw["num_items"] = num_items
            if loss_dtype is not None:
                kw["loss_dtype"] = loss_dtype
            with taken(small):
                loss, grad = _grad(xt.cross_entropy, z, t, **kw)
            leaf = z.detach().clone().requires_grad_()
            want = F.cross_entropy(leaf.float(), t.long(), ignore_index=ignore,
                                   reduction="sum" if num_items is not None else reduction)
            if num_items is not None:
                want = want / (float(num_items) if torch.is_tensor(num_items) else num_items)
            want.backward(torch.ones_like(want))
            assert loss.dtype == (loss_dtype or BF16) and grad.dtype == BF16
            _close(loss, want.detach().to(loss.dtype), rtol=2**-7, atol=0)
            # num_items scales the rounded gradient (the documented second rounding)
            _close(grad, leaf.grad, **_tol(BF16, scaled=num_items is not None))


# ---- rows whose target probability underflows: only they take log_softmax


def _underflow_case(case, dtype):
    g = torch.Generator().manual_seed(11)
    n, c = 10, 7
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, c, (n,), generator=g)
    ignore_index = -100
    deep = -120.0 if dtype == BF16 else (-800.0 if dtype == torch.float64 else -200.0)
    if case == "all rows":
        z[torch.arange(n), t] = deep
    elif case == "ignored and NaN rows":
        z[[0, 3, 7], t[[0, 3, 7]]] = deep
        t[[3, 4]] = ignore_index
        z[4, 0] = NAN  # an ignored NaN row: loss 0, gradient NaN (torch's)
        z[5, 2] = NAN  # a counted NaN row
        z[6] = -INF  # a counted row of -inf: NaN
    elif case == "ignore_index is a class":
        ignore_index = 2
        t[[0, 1]] = 2
        z[[0, 1, 8], t[[0, 1, 8]]] = deep  # rows 0 and 1 are ignored
    elif case == "every row ignored":
        z[torch.arange(n), t] = deep
        t[:] = ignore_index
    return z.to(dtype), t, ignore_index


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, BF16], ids=_name)
@pytest.mark.parametrize("case", ["all rows", "ignored and NaN rows", "ignore_index is a class",
                                  "every row ignored"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_underflowing_rows_with_ignored_and_nan_rows_are_torchs(small, dtype, case,
                                                                reduction):
    z, t, ignore_index = _underflow_case(case, dtype)
    n = z.shape[0]
    gos = ([None, torch.linspace(-2, 2, n, dtype=dtype)] if reduction == "none"
           else [None, torch.tensor(2.5, dtype=dtype), torch.tensor(NAN, dtype=dtype)])
    for go in gos:
        kw = {"reduction": reduction, "ignore_index": ignore_index}
        with taken(small):
            loss, grad = _grad(xt.cross_entropy, z, t, go, **kw)
        want_loss, want_grad = _reference(z, t, go, **kw)
        _close(loss, want_loss, **_tol(dtype))
        _close(grad, want_grad, **_tol(dtype, scaled=go is not None))
        if dtype != BF16:  # and torch's float64 numbers (where finite) to rounding
            exact_loss, exact_grad = _reference(z.double(), t, None if go is None
                                                else go.double(), **kw)
            _close(loss.double(), exact_loss, rtol=1e-5, atol=1e-6)
            _close(grad.double(), exact_grad, rtol=1e-5, atol=1e-6)


# ---- the pool: a buffer somebody still sees is never handed out


@pytest.mark.usefixtures("fresh_pool")
@pytest.mark.parametrize("dtype", [torch.float32, BF16, torch.float64], ids=_name)
def test_zero_grad_without_none_then_accumulating_micro_batches(small, dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(16, 24, generator=g, dtype=torch.float64)
    t = torch.randint(0, 24, (16,), generator=g)
    t[4] = -100
    ours = base.to(dtype).requires_grad_()
    ref = base.to(dtype).requires_grad_()
    opt_ours = torch.optim.SGD([ours], lr=0.1)
    opt_ref = torch.optim.SGD([ref], lr=0.1)
    for _ in range(3):  # zero_grad(set_to_none=False), two micro-batches, a step
        opt_ours.zero_grad(set_to_none=False)
        opt_ref.zero_grad(set_to_none=False)
        for k in range(2):
            with taken(small):
                xt.cross_entropy(ours * (k + 1), t).backward()
            # torch: float32 arithmetic on the upcast bfloat16 logits
            F.cross_entropy((ref * (k + 1)).float() if dtype == BF16 else ref * (k + 1),
                            t).backward()
            # a later same-shape call of other data must not touch the adopted .grad
            with taken(small):
                other = torch.randn(16, 24, dtype=torch.float64).to(dtype).requires_grad_()
                torch.autograd.grad(xt.cross_entropy(other, t), other)
        _close(ours.grad, ref.grad, **_tol(dtype, scaled=True))
        opt_ours.step()
        opt_ref.step()
    _close(ours.detach(), ref.detach(), **_tol(dtype, scaled=True))


@pytest.mark.usefixtures("fresh_pool")
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=_name)
def test_kept_results_stashing_hooks_and_retained_graphs_see_no_later_step(small, dtype):
    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, 20, (12,), generator=g)
    zs = [(torch.randn(12, 20, generator=g, dtype=torch.float64) * (k + 1)).to(dtype)
          for k in range(4)]
    kept, stashed, graphs = [], [], []
    for z in zs:
        a = z.clone().requires_grad_()
        a.register_hook(lambda grad: stashed.append(grad))  # the gradient kept by a hook
        with taken(small):
            loss = xt.cross_entropy(a, t)
        (grad,) = torch.autograd.grad(loss, a, retain_graph=True)
        kept.append(grad)
        graphs.append((loss, a))
    for _ in range(2):  # later steps of the same shape
        with taken(small):
            b = zs[0].clone().requires_grad_()
            xt.cross_entropy(b * 3, t).backward()
    for k, (z, (loss, a)) in enumerate(zip(zs, graphs, strict=True)):
        _, want = _reference(z, t)
        _close(kept[k], want, **_tol(dtype))
        _close(stashed[k], want, **_tol(dtype))
        (again,) = torch.autograd.grad(loss, a)  # the retained graph, after later steps
        _close(again, want, **_tol(dtype))
    assert len({s.data_ptr() for s in kept}) == len(kept)


@pytest.mark.usefixtures("fresh_pool")
@pytest.mark.parametrize("dtype", [torch.float32, BF16, torch.float64], ids=_name)
def test_hook_scaling_the_gradient_in_place_and_backward_twice_as_torch(small, dtype):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(10, 16, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randint(0, 16, (10,), generator=g)
    t[2] = -100
    results = []
    for fn in (xt.cross_entropy, None):
        a = z.clone().requires_grad_()
        a.register_hook(lambda grad: grad.mul_(3.0))  # modifies autograd's gradient in place
        if fn is None:
            loss = F.cross_entropy(a.float() if dtype == BF16 else a, t)
        else:
            with taken(small):
                loss = fn(a, t)
        loss.backward(retain_graph=True)
        loss.backward()
        results.append(a.grad)
    _close(results[0], results[1], **_tol(dtype, scaled=True))


@pytest.mark.usefixtures("fresh_pool")
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=_name)
def test_shared_memory_gradient_of_the_small_kernel_is_left_alone(small, dtype):
    g = torch.Generator().manual_seed(6)
    z = torch.randn(16, 30, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randint(0, 30, (16,), generator=g)
    a = z.clone().requires_grad_()
    with taken(small):
        xt.cross_entropy(a, t).backward()
    shared = a.grad.share_memory_()  # as torch.multiprocessing or Module.share_memory()
    snapshot = shared.clone()
    storage = shared.untyped_storage()
    a.grad = None
    del shared
    for k in range(3):
        with taken(small):
            b = (z.double() * (k + 2)).to(dtype).requires_grad_()
            xt.cross_entropy(b, t).backward()
    view = torch.empty(0, dtype=dtype).set_(storage, 0, snapshot.shape, snapshot.stride())
    _close(view, snapshot, rtol=0, atol=0)
    assert storage.data_ptr() not in {e.ptr for e in _buffers._pool}


@pytest.mark.usefixtures("fresh_pool")
def test_threads_mixing_bfloat16_and_float32_buffers_of_equal_bytes(small):
    # bfloat16 (16, 40): a float32 work buffer of 16 x 40 x 4 bytes and a bfloat16 gradient
    # of 16 x 40 x 2, the byte sizes of float32 (16, 40) and (16, 20) gradients
    cases = [((16, 40), BF16), ((16, 40), torch.float32), ((16, 20), torch.float32),
             ((16, 40), BF16)]
    data = []
    for i, (shape, dtype) in enumerate(cases):
        g = torch.Generator().manual_seed(40 + i)
        z = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(dtype)
        t = torch.randint(0, shape[1], (shape[0],), generator=g)
        t[i] = -100
        data.append((z, t, _reference(z, t, reduction=REDUCTIONS[i % 3])))
    barrier = threading.Barrier(len(cases), timeout=30)

    def work(i):
        z, t, _ = data[i]
        barrier.wait()
        out = []
        for _ in range(20):
            leaf = z.clone().requires_grad_()
            loss = xt.cross_entropy(leaf, t, reduction=REDUCTIONS[i % 3])
            loss.backward(torch.ones_like(loss))
            out.append((loss.detach(), leaf.grad))
        return out

    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(work, range(len(cases)), timeout=60))
    assert len(small) == 20 * len(cases)
    for (z, _, (want_loss, want_grad)), got in zip(data, results, strict=True):
        for loss, grad in got:  # every kept gradient still its own
            _close(loss, want_loss, **_tol(z.dtype))
            _close(grad, want_grad, **_tol(z.dtype))


# ---- float32 at any size; float64 and bfloat16 keep 2**23 below 64 classes


def test_float32_past_2_23_logits_takes_the_small_kernel_with_torchs_numbers(routes):
    g = torch.Generator().manual_seed(8)
    n, c = 8193, 1024  # 2**23 + 1024 float32 logits, 32 MiB
    assert n * c > _backends.SMALL_MAX_LOGITS
    z = torch.randn(n, c, generator=g) * 4
    t = torch.randint(0, c, (n,), generator=g)
    t[::9] = -100
    z[5, t[5]] = -300.0  # p_y underflows float32
    z[6, 3] = NAN
    leaf = z.clone().requires_grad_()
    loss = xt.cross_entropy(leaf, t)
    assert routes == ["small"]
    loss.backward()
    first = leaf.grad.clone()
    loss2 = xt.cross_entropy(leaf * 0.5, t, reduction="sum")  # accumulates into .grad
    loss2.backward()
    ref = z.double().requires_grad_()
    want = F.cross_entropy(ref, t)
    want.backward()
    want_first = ref.grad.clone()
    want2 = F.cross_entropy(ref * 0.5, t, reduction="sum")
    want2.backward()
    assert routes == ["small", "small"]
    _close(loss.double(), want.detach(), rtol=1e-5, atol=0)  # NaN: row 6
    _close(loss2.double(), want2.detach(), rtol=1e-5, atol=0)
    _close(first.double(), want_first, rtol=1e-5, atol=1e-9)
    _close(leaf.grad.double(), ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, BF16], ids=_name)
@pytest.mark.parametrize("classes", [63, 64])
def test_the_size_limit_per_dtype_with_lowered_thresholds(monkeypatch, routes, dtype,
                                                          classes):
    monkeypatch.setattr(_backends, "NATIVE_MAX_LOGITS", 512)
    monkeypatch.setattr(_backends, "SMALL_MIN_LOGITS", 1)
    monkeypatch.setattr(_backends, "SMALL_MAX_LOGITS", 4096)
    g = torch.Generator().manual_seed(9)
    for rows in (4096 // classes, 4096 // classes + 2):
        z = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * 3).to(dtype)
        t = torch.randint(0, classes, (rows,), generator=g)
        t[::5] = -100
        routes.clear()
        loss, grad = _grad(xt.cross_entropy, z, t)
        above = rows * classes >= 4096
        small = dtype == torch.float32 or classes < 64 or not above
        assert routes == ["small" if small else "rowblock"], (rows, classes, routes)
        want_loss, want_grad = _reference(z, t)
        _close(loss, want_loss, **_tol(dtype))
        _close(grad, want_grad, **_tol(dtype))


# ---- probability targets of 64-127 classes: torch's kernel when no logit is -inf


@pytest.mark.parametrize("dtype", [torch.float32, BF16, torch.float16], ids=_name)
@pytest.mark.parametrize("classes", [64, 127, 128])
@pytest.mark.parametrize("bad", ["none", "-inf", "nan", "both"])
def test_probability_targets_of_64_to_127_classes(monkeypatch, routes, dtype, classes, bad):
    monkeypatch.setattr(_backends, "NATIVE_MAX_LOGITS", 2048)  # the large-call routes
    g = torch.Generator().manual_seed(10)
    rows = 2048 // classes + 1
    z = torch.randn(rows, classes, generator=g, dtype=torch.float64) * 2
    t = torch.softmax(torch.randn(rows, classes, generator=g, dtype=torch.float64), 1)
    if bad in ("-inf", "both"):  # a zero target on a -inf logit (crossent: term 0)
        z[3, 5], t[3, 5] = -INF, 0.0
        t[3] /= t[3].sum()
    if bad in ("nan", "both"):
        z[7 if bad == "nan" else 3, 2] = NAN
    w = torch.rand(classes, generator=g, dtype=torch.float64) + 0.5
    zd, td = z.to(dtype), t.to(dtype)
    for weight, smoothing in ((None, 0.0), (w, 0.1)):
        routes.clear()
        a = zd.clone().requires_grad_()
        loss = xt.cross_entropy(a, td, weight=None if weight is None else weight.to(dtype),
                                label_smoothing=smoothing, reduction="none")
        loss.sum().backward()
        neg_inf = bad in ("-inf", "both")
        assert routes == ["native" if classes < 128 and not neg_inf else "rowblock"]
        r = zd.double()
        if neg_inf and smoothing == 0.0:
            r[3, 5] = -1e300  # the documented limit: the zero target's term is 0
        r.requires_grad_()
        want = F.cross_entropy(r, td.double(), weight=weight, label_smoothing=smoothing,
                               reduction="none")
        want.sum().backward()
        tol = ({"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32
               else {"rtol": 2e-2, "atol": 2e-2})
        _close(loss.double(), want.detach(), **tol)
        _close(a.grad.double(), r.grad, **tol)


def _inference(shape):
    with torch.inference_mode():
        return torch.zeros(shape)


@pytest.mark.parametrize("make, expected", [
    (lambda: torch.empty(0, 5), False),
    (lambda: torch.empty(3, 0), False),
    # -inf only in columns the view leaves out
    (lambda: torch.tensor([[0.0, 1.0, -INF]] * 3)[:, :2], False),
    (lambda: torch.tensor([[0.0, 1.0, -INF]] * 3)[:, ::2], True),
    (lambda: torch.tensor([[0.0, -INF], [1.0, 2.0]]).t(), True),
    (lambda: torch.tensor([[0.0, -INF], [NAN, 2.0]], requires_grad=True), True),
    (lambda: torch.tensor([[NAN, -3e38], [INF, 2.0]], requires_grad=True), False),
    (lambda: torch.tensor([[-torch.finfo(torch.float64).max, NAN]], dtype=torch.float64),
     False),
    (lambda: torch.tensor([[1.0, NAN, -INF]], dtype=torch.float16), True),
    (lambda: torch.tensor([[NAN, -INF, 1.0]], dtype=BF16), True),
    (lambda: torch.tensor([[2.0]]).expand(4, 3), False),
    (lambda: _inference((2, 3)), False),
])
def test_has_neg_inf(make, expected):
    x = make()
    assert _backends.has_neg_inf(x) is expected
    assert _backends.has_neg_inf(x) is bool(torch.isneginf(x.detach()).any())
