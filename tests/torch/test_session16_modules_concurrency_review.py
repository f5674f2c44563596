"""Session 16 trust round: crossent.torch's modules and its behaviour under threads,
processes, grad modes and autocast, probed where the earlier files do not look.

References: torch's own modules and ``F.cross_entropy`` / ``F.linear`` (float64 where
the comparison should be tight). Every thread or process test runs under a timeout.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import crossent.torch as xt
from crossent import InputError
from crossent.torch import _backends

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- modules


def _linear_pair(dtype=torch.float32, **kwargs):
    theirs = nn.LinearCrossEntropyLoss(4, 6, bias=True, dtype=dtype, **kwargs)
    ours = xt.LinearCrossEntropyLoss(4, 6, bias=True, dtype=dtype, chunk_size=2, **kwargs)
    with torch.no_grad():
        theirs.linear.weight.copy_(torch.randn(6, 4, generator=_gen(1)))
        theirs.linear.bias.copy_(torch.randn(6, generator=_gen(2)))
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_module_low_precision_conversion_follows_torchs_module(dtype):
    """``.half()`` / ``.bfloat16()`` convert the class-weight buffer with the head; the
    loss and gradients keep torch's dtypes, within a low-precision ulp of a float64
    head with the same (rounded) parameters."""
    ours, theirs = _linear_pair(weight=torch.rand(6, generator=_gen(3)) + 0.5,
                                label_smoothing=0.1)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    exact = copy.deepcopy(theirs).double()
    assert ours.weight.dtype == theirs.weight.dtype == dtype
    x = torch.randn(8, 4, generator=_gen(4)).to(dtype)
    y = torch.randint(0, 6, (8,), generator=_gen(5))
    y[3] = -100
    results = []
    for m, inp in ((ours, x), (theirs, x), (exact, x.double())):
        loss = m(inp, y)
        loss.backward()
        results.append((loss, m.linear.weight.grad, m.linear.bias.grad))
    for got, want, ref in zip(*results, strict=True):
        assert got.dtype == want.dtype == dtype
        scale = float(ref.detach().abs().max())
        torch.testing.assert_close(got.detach().double(), ref.detach(), rtol=0,
                                   atol=2e-2 * scale + 1e-3)


def test_linear_module_under_autocast_with_mixed_dtype_input_as_torch():
    ours, theirs = _linear_pair()
    x = torch.randn(8, 4, generator=_gen(6)).bfloat16()
    y = torch.randint(0, 6, (8,), generator=_gen(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = theirs(x, y)
        got = ours(x, y)
        fn_want = F.cross_entropy(F.linear(x.float(), theirs.linear.weight.bfloat16()), y)
        fn_got = xt.linear_cross_entropy(x.float(), ours.linear.weight.bfloat16(), y)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fn_got, fn_want, rtol=1e-5, atol=1e-5)


def test_modules_compiled_fullgraph_dynamic_batches_including_one_and_zero():
    """``torch.compile(module, fullgraph=True, dynamic=True)`` over batch sizes 5, 1 and
    0 (dynamic shapes specialise 0 and 1): torch's module's loss and gradients each time."""
    torch._dynamo.reset()
    cw = torch.rand(6, generator=_gen(8)) + 0.5
    pairs = [(xt.CrossEntropyLoss(cw, reduction="none", label_smoothing=0.1),
              nn.CrossEntropyLoss(cw, reduction="none", label_smoothing=0.1))]
    ours_lin, theirs_lin = _linear_pair()
    try:
        for ours, theirs in pairs:
            compiled = torch.compile(ours, fullgraph=True, dynamic=True, backend="aot_eager")
            for n in (5, 1, 0):
                z = torch.randn(n, 6, generator=_gen(n))
                y = torch.randint(0, 6, (n,), generator=_gen(n + 10))
                outs = []
                for m in (compiled, theirs):
                    leaf = z.clone().requires_grad_()
                    loss = m(leaf, y)
                    loss.sum().backward()
                    outs.append((loss.detach(), leaf.grad))
                for a, b in zip(*outs, strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        compiled = torch.compile(ours_lin, fullgraph=True, dynamic=True, backend="aot_eager")
        for n in (5, 1, 0):
            x = torch.randn(n, 4, generator=_gen(n))
            y = torch.randint(0, 6, (n,), generator=_gen(n + 10))
            outs = []
            for m, mod in ((compiled, ours_lin), (theirs_lin, theirs_lin)):
                mod.zero_grad()
                loss = m(x, y)
                loss.backward()
                outs.append((loss.detach(), mod.linear.weight.grad.clone()))
            for a, b in zip(*outs, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    finally:
        torch._dynamo.reset()


def test_exported_and_traced_modules_give_torchs_numbers_on_new_inputs():
    """``torch.export.export`` and ``torch.jit.trace`` of both modules, run on inputs
    other than the example ones."""
    ours_ce = xt.CrossEntropyLoss(label_smoothing=0.2)
    ours_lin, theirs_lin = _linear_pair()
    z, y = torch.randn(4, 6, generator=_gen(9)), torch.randint(0, 6, (4,), generator=_gen(10))
    x = torch.randn(4, 4, generator=_gen(11))
    new_z, new_x = z * 3 - 1, x * -2
    exported = torch.export.export(ours_ce, (z, y)).module()
    torch.testing.assert_close(exported(new_z, y), F.cross_entropy(new_z, y,
                                                                   label_smoothing=0.2))
    exported = torch.export.export(ours_lin, (x, y)).module()
    torch.testing.assert_close(exported(new_x, y), theirs_lin(new_x, y))
    with pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(ours_ce, (z, y))
    torch.testing.assert_close(traced(new_z, y), F.cross_entropy(new_z, y,
                                                                 label_smoothing=0.2))


def test_state_dict_of_a_weighted_module_into_an_unweighted_one_raises_as_torch():
    weighted = nn.CrossEntropyLoss(torch.rand(5) + 0.5).state_dict()
    for module in (xt.CrossEntropyLoss(), nn.CrossEntropyLoss()):
        with pytest.raises(RuntimeError, match="Unexpected key"):
            module.load_state_dict(weighted)


def test_module_with_a_weight_parameter_and_probability_targets_trains_it_as_torch():
    """A class weight registered as a Parameter (learned re-weighting): its gradient with
    probability targets is torch's."""
    z = torch.randn(7, 5, generator=_gen(12), dtype=F64)
    p = torch.rand(7, 5, generator=_gen(13), dtype=F64).softmax(1)
    grads = []
    for cls in (xt.CrossEntropyLoss, nn.CrossEntropyLoss):
        module = cls(label_smoothing=0.1)
        del module.weight
        module.weight = nn.Parameter(torch.linspace(0.5, 2.0, 5, dtype=F64))
        module(z, p).backward()
        grads.append(module.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_negative_softcap_message_does_not_invite_zero():
    z, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(InputError, match="softcap") as info:
        xt.cross_entropy(z, y, softcap=-2.0)
    assert ">= 0" not in str(info.value)


def test_repr_shows_every_option_that_changes_the_result():
    for module in (xt.CrossEntropyLoss(loss_dtype=torch.float32),
                   xt.LinearCrossEntropyLoss(3, 4, loss_dtype=torch.float32)):
        assert "loss_dtype=torch.float32" in repr(module)


# ---------------------------------------------------------------- threads


@pytest.fixture
def route(request, monkeypatch):
    """``small``: the few-operation fused kernel; ``rowblock``: the row-block kernel on a
    leaf; ``activation``: the row-block kernel on a non-leaf."""
    if request.param == "small":
        monkeypatch.setattr(_backends, "NATIVE_MAX_LOGITS", 1 << 19)
        monkeypatch.setattr(_backends, "SMALL_MIN_LOGITS", 1)
    previous = xt.set_buffer_reuse(True)
    yield request.param
    xt.set_buffer_reuse(previous)


def _run_threads(work, count=4, timeout=60):
    errors: list = []

    def guarded(k):
        try:
            work(k)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(k,)) for k in range(count)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=timeout)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, errors


@pytest.mark.parametrize("route", ["small", "rowblock", "activation"], indirect=True)
def test_the_same_leaf_from_four_threads_grad_and_accumulated_backward(route):
    """Four threads on the SAME float32 logits (and the same linear weight), with buffer
    reuse on: every gradient each thread kept equals torch's single-threaded one after
    all threads finished (no buffer handed out twice), and ``.backward()`` from all of
    them accumulates exactly 4 x the steps' gradients."""
    z = torch.randn(64, 50, generator=_gen(14), requires_grad=True)
    y = torch.randint(0, 50, (64,), generator=_gen(15))
    y[::7] = -100
    x = torch.randn(64, 16, generator=_gen(16))
    w = torch.randn(50, 16, generator=_gen(17), requires_grad=True)
    backend = "auto" if route == "small" else "rowblock"

    def ce():
        return xt.cross_entropy(z * 1.0 if route == "activation" else z, y, backend=backend)

    def head():
        return xt.linear_cross_entropy(x, w, y, chunk_size=8, backend=backend)

    want_z = torch.autograd.grad(F.cross_entropy(z, y), z)[0]
    want_w = torch.autograd.grad(F.cross_entropy(F.linear(x, w), y), w)[0]
    kept: list = [[] for _ in range(4)]

    def work(k):
        for _ in range(6):
            kept[k].append((torch.autograd.grad(ce(), z)[0], torch.autograd.grad(head(), w)[0]))

    _run_threads(work)
    for per_thread in kept:
        for gz, gw in per_thread:
            torch.testing.assert_close(gz, want_z)
            torch.testing.assert_close(gw, want_w, rtol=1e-5, atol=1e-6)

    def accumulate(k):
        for _ in range(3):
            ce().backward()
            head().backward()

    _run_threads(accumulate)
    torch.testing.assert_close(z.grad, 12 * want_z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, 12 * want_w, rtol=1e-5, atol=1e-5)


def test_empty_cache_and_reuse_toggles_racing_three_training_threads():
    """Another thread empties the buffer pool and flips buffer reuse over and over while
    three threads take gradients: every kept gradient and every accumulated ``.grad``
    stays torch's (no buffer freed or handed out while a caller still holds it)."""
    zs = [torch.randn(128, 60, generator=_gen(90 + k), requires_grad=True) for k in range(3)]
    y = torch.randint(0, 60, (128,), generator=_gen(93))
    y[::9] = -100
    wants = [torch.autograd.grad(F.cross_entropy(z, y), z)[0] for z in zs]
    kept: list = [[] for _ in range(3)]
    stop = threading.Event()
    previous = xt.set_buffer_reuse(True)

    def churn():
        flips = 0
        while not stop.is_set():
            xt.empty_cache()
            flips += 1
            xt.set_buffer_reuse(flips % 7 != 0)

    def work(k):
        for _ in range(15):
            loss = xt.cross_entropy(zs[k] * 1.0, y, backend="rowblock")
            kept[k].append(torch.autograd.grad(loss, zs[k])[0])
            xt.cross_entropy(zs[k], y, backend="rowblock").backward()

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        _run_threads(work, count=3)
    finally:
        stop.set()
        churner.join(timeout=30)
        xt.set_buffer_reuse(previous)
    assert not churner.is_alive()
    for k in range(3):
        for got in kept[k]:
            torch.testing.assert_close(got, wants[k])
        torch.testing.assert_close(zs[k].grad, 15 * wants[k], rtol=1e-5, atol=1e-6)


def test_one_module_called_from_four_threads_on_their_own_batches():
    cw = torch.rand(9, generator=_gen(18), dtype=F64) + 0.5
    ce_ours = xt.CrossEntropyLoss(cw, label_smoothing=0.1, z_loss=0.0)
    ce_theirs = nn.CrossEntropyLoss(cw, label_smoothing=0.1)
    lin_ours, lin_theirs = _linear_pair(dtype=F64)
    data = [(torch.randn(40, 9, generator=_gen(20 + k), dtype=F64),
             torch.randn(40, 4, generator=_gen(30 + k), dtype=F64),
             torch.randint(0, 6, (40,), generator=_gen(40 + k))) for k in range(4)]

    def losses(ce, lin, k):
        z, x, y = data[k]
        leaf = z.clone().requires_grad_()
        loss = ce(leaf, y)
        (gz,) = torch.autograd.grad(loss, leaf)
        head = lin(x, y)
        (gw,) = torch.autograd.grad(head, lin.linear.weight)
        return loss.detach(), gz, head.detach(), gw

    want = [losses(ce_theirs, lin_theirs, k) for k in range(4)]
    got: list = [None] * 4

    def work(k):
        for _ in range(4):
            got[k] = losses(ce_ours, lin_ours, k)

    _run_threads(work)
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            torch.testing.assert_close(a, b)


def test_one_thread_and_the_default_give_the_same_bits():
    """``torch.set_num_threads(1)`` against the default (two or more threads): the
    row-block kernel and the chunked head give identical bits, equal to torch's."""
    z = torch.randn(300, 70, generator=_gen(50), dtype=F64)
    y = torch.randint(0, 70, (300,), generator=_gen(51))
    x = torch.randn(300, 12, generator=_gen(52), dtype=F64)
    w = torch.randn(70, 12, generator=_gen(53), dtype=F64)

    def run():
        leaf, wl = z.clone().requires_grad_(), w.clone().requires_grad_()
        a = xt.cross_entropy(leaf, y, label_smoothing=0.1, backend="rowblock")
        b = xt.linear_cross_entropy(x, wl, y, chunk_size=64)
        (a + b).backward()
        return a.detach(), b.detach(), leaf.grad, wl.grad

    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    try:
        many = run()
        torch.set_num_threads(1)
        one = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(many, one, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(many[0], F.cross_entropy(z, y, label_smoothing=0.1))
    torch.testing.assert_close(many[1], F.cross_entropy(F.linear(x, w), y))


# ---------------------------------------------------------------- processes


def _child_losses(modules, data, queue):
    torch.set_num_threads(1)  # no OpenMP region in a forked child (GNU OpenMP may hang)
    ce, lin = pickle.loads(modules)
    z, x, y = data
    leaf = z.clone().requires_grad_()
    loss = ce(leaf, y)
    loss.backward()
    head = lin(x, y)
    head.backward()
    # by value (plain pickle): torch's queue reductions would share file descriptors that
    # vanish when this child exits before the parent reads them
    queue.put(pickle.dumps((loss.detach(), leaf.grad, head.detach(),
                            lin.linear.weight.grad)))


def test_forked_worker_with_pickled_modules_after_the_parent_used_every_kernel():
    """The parent runs the row-block kernel (worker threads, buffer pool) and the chunked
    head first; a forked worker unpickles both modules and computes torch's numbers."""
    ce = xt.CrossEntropyLoss(torch.rand(6, generator=_gen(60), dtype=F64) + 0.5,
                             label_smoothing=0.1, backend="rowblock")
    lin, theirs_lin = _linear_pair(dtype=F64)
    z = torch.randn(200, 6, generator=_gen(61), dtype=F64)
    x = torch.randn(200, 4, generator=_gen(62), dtype=F64)
    y = torch.randint(0, 6, (200,), generator=_gen(63))
    ce(z.clone().requires_grad_(), y).backward()  # the parent's pool and workers exist
    lin(x, y).backward()
    lin.zero_grad()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_losses, args=(pickle.dumps((ce, lin)), (z, x, y), queue))
    child.start()
    try:
        got = pickle.loads(queue.get(timeout=60))
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    leaf = z.clone().requires_grad_()
    want_loss = F.cross_entropy(leaf, y, ce.weight, label_smoothing=0.1)
    want_loss.backward()
    want_head = theirs_lin(x, y)
    want_head.backward()
    for a, b in zip(got, (want_loss.detach(), leaf.grad, want_head.detach(),
                          theirs_lin.linear.weight.grad), strict=True):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- grad modes, autocast


def test_enable_grad_inside_no_grad_and_no_graph_under_no_grad():
    z = torch.randn(12, 7, generator=_gen(70), requires_grad=True)
    y = torch.randint(0, 7, (12,), generator=_gen(71))
    x = torch.randn(12, 4, generator=_gen(72))
    w = torch.randn(7, 4, generator=_gen(73), requires_grad=True)
    want_z = torch.autograd.grad(F.cross_entropy(z, y), z)[0]
    want_w = torch.autograd.grad(F.cross_entropy(F.linear(x, w), y), w)[0]
    with torch.no_grad():
        for backend in ("auto", "native", "rowblock"):
            assert not xt.cross_entropy(z, y, backend=backend).requires_grad
            assert not xt.linear_cross_entropy(x, w, y, chunk_size=5,
                                               backend=backend).requires_grad
            with torch.enable_grad():
                gz = torch.autograd.grad(xt.cross_entropy(z, y, backend=backend), z)[0]
                gw = torch.autograd.grad(xt.linear_cross_entropy(x, w, y, chunk_size=5,
                                                                 backend=backend), w)[0]
            torch.testing.assert_close(gz, want_z)
            torch.testing.assert_close(gw, want_w)


@pytest.mark.parametrize("backend", ["auto", "native", "rowblock"])
def test_autocast_dtypes_follow_torchs_float32_policy(backend):
    """Under CPU autocast torch runs cross_entropy in float32: float16 logits (under a
    bfloat16 and a float16 autocast), a bfloat16 probability target with float32
    logits; float64 logits stay float64. Loss dtype, gradient dtype and value as torch."""
    g = _gen(80)
    z32 = torch.randn(10, 6, generator=g) * 3
    y = torch.randint(0, 6, (10,), generator=g)
    p = torch.rand(10, 6, generator=g).softmax(1)
    cases = [(torch.bfloat16, z32.half(), y), (torch.float16, z32.half(), y),
             (torch.float16, z32.bfloat16(), y), (torch.bfloat16, z32, p.bfloat16()),
             (torch.bfloat16, z32.double(), y)]
    for cast, z, target in cases:
        outs = []
        for fn in (xt.cross_entropy, F.cross_entropy):
            leaf = z.clone().requires_grad_()
            kw = {"backend": backend} if fn is xt.cross_entropy else {}
            with torch.autocast("cpu", dtype=cast):
                loss = fn(leaf, target, label_smoothing=0.1, **kw)
            loss.backward()
            outs.append((loss, leaf.grad))
        (a, ga), (b, gb) = outs
        assert (a.dtype, ga.dtype) == (b.dtype, gb.dtype), (cast, z.dtype, target.dtype)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ga.float(), gb.float(), rtol=1e-2, atol=1e-3)
