"""Adversarial review (H22) of the session's changes since fa61ce4, outside the small-batch
kernel's internals (``test_small_kernel.py``) and ``_custom_ops.py``:

1. ``_blockpool.run_row_blocks(min_rows=)`` and the two callers in ``_inductor``
   (``_scaled_rows``'s direct kernel, ``_scaled_blocks`` choosing compile-or-run per block);
2. the linear head's backward reading ``grad_output`` to the host once and
   ``_rules.scale_stored`` moving a host factor to ``counted``'s device;
3. ``torch.autograd.grad(..., is_grads_batched=True)`` recomputed in the row-block
   cross-entropy and the CPU linear head (spatial shapes, probability targets and class
   weights that require grad, ``inplace_backward``, retained graphs, create_graph after);
4. the route ``"small"`` of ``_backends.choose_backend`` and the checked path's
   ``_small_cross_entropy`` (narrow targets, spatial and unbatched shapes, statistics,
   num_items, meta tensors, 0-row input, batched grad_outputs);
5. ``_rules.check_intact``'s message and ``_rules.nan_at_targets`` (the row-block kernel's
   backward under infinite grad_output).

References are independent of crossent: ``torch.nn.functional.cross_entropy`` /
``F.linear`` (same dtype and float64), direct softmax formulas, and partitions checked by
their defining properties. Never a value copied from crossent's own output.
"""

from __future__ import annotations

import itertools
import math
import threading

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError
from crossent.torch import _backends, _blockpool, _inductor, _rules, _small

pytestmark = pytest.mark.timeout(120)

NAN, INF = math.nan, math.inf


def _close(got, want, **tol):
    torch.testing.assert_close(got, want, equal_nan=True, **tol)


def _graph_names(out: torch.Tensor) -> set[str]:
    """Names of every autograd node behind ``out``."""
    seen, todo, names = set(), [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.add(node.name())
        todo.extend(n for n, _ in node.next_functions)
    return names


def _uses(out: torch.Tensor, fragment: str) -> bool:
    return any(fragment in name for name in _graph_names(out))


# ---- 1. run_row_blocks(min_rows=) and its callers


def _check_partition(blocks, num_rows, step, min_rows):
    """The defining properties: disjoint, in order, covering [0, num_rows); every block
    but the last exactly ``step`` rows; the last at least ``min_rows`` unless it is the
    only one, and at most ``step + min_rows - 1``."""
    blocks = sorted(blocks)
    if num_rows == 0:
        assert blocks == []
        return
    assert blocks[0][0] == 0 and blocks[-1][1] == num_rows
    for (_, j), (i, _) in itertools.pairwise(blocks):
        assert j == i
    assert all(j - i == step for i, j in blocks[:-1])
    last = blocks[-1][1] - blocks[-1][0]
    assert 1 <= last <= step + min_rows - 1
    if len(blocks) > 1:
        assert last >= min_rows


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_run_row_blocks_partitions_rows_with_a_minimum_last_block(device, workers):
    for num_rows in range(0, 23):
        for step in range(1, 6):
            for min_rows in range(1, step + 1):
                blocks: list[tuple[int, int]] = []
                lock = threading.Lock()

                def record(i, j, blocks=blocks, lock=lock):
                    with lock:
                        blocks.append((i, j))

                _blockpool.run_row_blocks(record, num_rows, step, torch.device(device),
                                          min_rows=min_rows)
                _check_partition(blocks, num_rows, step, min_rows)
                if device == "meta":  # in order, in the calling thread
                    assert blocks == sorted(blocks)


def test_run_row_blocks_default_keeps_a_one_row_last_block():
    blocks: list[tuple[int, int]] = []
    _blockpool.run_row_blocks(lambda i, j: blocks.append((i, j)), 7, 3, torch.device("meta"))
    assert blocks == [(0, 3), (3, 6), (6, 7)]


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_run_row_blocks_propagates_a_blocks_exception(device, workers):
    def fail_on_last(i, j):
        if j == 9:
            raise ValueError(f"block {i}:{j}")

    with pytest.raises(ValueError, match="block 6:9"):
        _blockpool.run_row_blocks(fail_on_last, 9, 2, torch.device(device), min_rows=2)


def test_run_row_blocks_from_several_threads_at_once(workers):
    """Four callers share the pool: each gets every one of its rows written once."""
    outs = [torch.zeros(37) for _ in range(4)]
    errors = []

    def caller(out):
        try:
            for _ in range(5):
                def write(i, j, out=out):
                    out[i:j] += 1.0

                _blockpool.run_row_blocks(write, out.numel(), 4, out.device, min_rows=3)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for o in outs:
        assert torch.equal(o, torch.full((37,), 5.0))


class _FakeDirectKernel:
    """Stands for inductor's compiled C function (no compile in this test): the formula
    ``out = a exp(z - k) / s`` per row, recording the blocks it was given."""

    inplace = True

    def __init__(self):
        self.blocks: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def __call__(self, z, k, a, s, out, i, j):
        with self.lock:
            self.blocks.append((i, j))
        assert j - i >= 2, "the compiled kernel takes 2 rows at least"
        e = torch.exp(z[i:j].double() - k[i:j, None].double())
        s[i:j] = e.sum(1).float()
        out[i:j] = (e / e.sum(1, keepdim=True) * a[i:j, None].double()).to(out.dtype)


@pytest.mark.parametrize("num_rows", [2, 3, 5, 7, 8, 11])
@pytest.mark.parametrize("inplace", [False, True])
def test_scaled_rows_direct_kernel_blocks_have_two_rows_and_every_row(num_rows, inplace,
                                                                      monkeypatch, workers):
    classes = 6
    fake = _FakeDirectKernel()
    monkeypatch.setattr(_inductor, "_direct_kernel", lambda dtype: fake)
    monkeypatch.setattr(_inductor, "_DIRECT_BLOCK_ELEMENTS", 2 * classes)  # step 2
    g = torch.Generator().manual_seed(num_rows)
    z = torch.randn(num_rows, classes, generator=g)
    k = z.max(1).values
    a = torch.rand(num_rows, generator=g) + 0.5
    want = torch.softmax(z.double(), 1) * a[:, None].double()
    want_s = torch.exp(z.double() - k[:, None].double()).sum(1)
    zin = z.clone()
    out = zin if inplace else torch.empty_like(z)
    s = _inductor._scaled_rows(zin, k, a, out)
    _check_partition(fake.blocks, num_rows, 2, 2)
    _close(out.double(), want, rtol=1e-6, atol=1e-7)
    _close(s.double(), want_s, rtol=1e-6, atol=1e-6)


def test_scaled_blocks_compiles_until_a_block_has_compiled_then_runs(monkeypatch):
    """The compile-or-run choice is made at each block: the first block compiles (under
    the lock), the next ones run what compiled; a dtype another thread compiled meanwhile
    is run, not compiled again."""
    calls: list[str] = []

    def fake_compile(z, k, a, out):
        calls.append("compile")
        _inductor._compiled_dtypes.add(z.dtype)
        return _inductor._scaled_softmax(z, k, a, out)

    def fake_scaled(z, k, a, out):
        calls.append("run")
        return _inductor._scaled_softmax(z, k, a, out)

    monkeypatch.setattr(_inductor, "_compiled_dtypes", set())
    monkeypatch.setattr(_inductor, "_compile", fake_compile)
    monkeypatch.setattr(_inductor, "_scaled", fake_scaled)
    monkeypatch.setattr(_inductor, "_BLOCK_ELEMENTS", 8)  # 2 rows of 4 classes a block
    g = torch.Generator().manual_seed(3)
    z = torch.randn(7, 4, generator=g)
    k = z.max(1).values
    a = torch.ones(7)
    for inplace in (False, True):
        calls.clear()
        _inductor._compiled_dtypes.clear()
        zin = z.clone()
        out = zin if inplace else torch.empty_like(z)
        s = torch.empty(7)
        _inductor._scaled_blocks(zin, k, a, out, s, inplace)
        assert calls == ["compile", "run", "run", "run"]
        _close(out, torch.softmax(z, 1), rtol=1e-6, atol=1e-7)
        _close(s, torch.exp(z - k[:, None]).sum(1), rtol=1e-6, atol=1e-6)

    # compiled elsewhere after the first block: run from then on
    calls.clear()
    _inductor._compiled_dtypes.clear()

    def compile_without_marking(z, k, a, out):
        calls.append("compile")
        if len(calls) == 2:  # another thread finished compiling meanwhile
            _inductor._compiled_dtypes.add(z.dtype)
        return _inductor._scaled_softmax(z, k, a, out)

    monkeypatch.setattr(_inductor, "_compile", compile_without_marking)
    _inductor._scaled_blocks(z.clone(), k, a, torch.empty_like(z), torch.empty(7), False)
    assert calls == ["compile", "compile", "run", "run"]


# ---- 2. the linear head's backward: one host read of grad_output


def _linear_data(seed, dtype=torch.float64, ignored=(1,)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(5, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randint(0, 5, (6,), generator=g)
    for i in ignored:
        t[i] = -100
    return x, w, b, t


def _linear_grads(fn, x, w, b, t, go, reduction, **kw):
    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    loss = fn(*leaves, t, reduction=reduction, **kw)
    loss.backward(go)
    return loss.detach(), [v.grad for v in leaves]


def _ours_linear(x, w, b, t, reduction, **kw):
    return xt.linear_cross_entropy(x, w, t, b, reduction=reduction, **kw)


def _torch_linear(x, w, b, t, reduction, **kw):
    return F.cross_entropy(F.linear(x, w, b), t, reduction=reduction, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ignored", [(), (1, 4), tuple(range(6))])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_head_grad_output_values(reduction, ignored, dtype):
    x, w, b, t = _linear_data(7, dtype, ignored)
    for value in (1.0, 0.0, -2.5, 1e-30, 1e20, INF, -INF, NAN):
        go = torch.tensor(value, dtype=dtype)
        loss, got = _linear_grads(_ours_linear, x, w, b, t, go, reduction)
        _close(go, torch.tensor(value, dtype=dtype))  # the caller's grad_output untouched
        want_loss, want = _linear_grads(_torch_linear, x, w, b, t, go, reduction)
        _close(loss, want_loss)
        tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
        for a, e in zip(got, want, strict=True):
            _close(a, e, **tol)


def test_linear_head_float64_retained_graph_gives_each_grad_output_its_gradient():
    """float64 keeps the stored gradients: a later backward with another grad_output is
    scaled from the unscaled copy (the host-read factor never leaks into the kept one)."""
    x, w, b, t = _linear_data(8)
    mine = [v.clone().requires_grad_() for v in (x, w, b)]
    ref = [v.clone().requires_grad_() for v in (x, w, b)]
    loss = _ours_linear(*mine, t, "mean")
    want_loss = _torch_linear(*ref, t, "mean")
    for value in (3.0, -0.5, 1.0, INF, 2.0):
        go = torch.tensor(value, dtype=torch.float64)
        got = torch.autograd.grad(loss, mine, go, retain_graph=True)
        want = torch.autograd.grad(want_loss, ref, go, retain_graph=True)
        for a, e in zip(got, want, strict=True):
            _close(a, e)


def test_linear_head_bfloat16_inputs_with_a_float32_grad_output():
    x, w, b, t = _linear_data(9, torch.bfloat16)
    go = torch.tensor(2.5)
    for reduction in ("mean", "sum"):
        loss, got = _linear_grads(_ours_linear, x, w, b, t, go.to(torch.bfloat16), reduction)
        # torch in float32 (crossent's arithmetic), gradients rounded once to bfloat16
        want_loss, want = _linear_grads(_torch_linear, x.float(), w.float(), b.float(), t,
                                        go, reduction)
        _close(loss.float(), want_loss, rtol=2e-2, atol=2e-2)
        for a, e in zip(got, want, strict=True):
            assert a.dtype == torch.bfloat16
            _close(a.float(), e, rtol=3e-2, atol=3e-2)


def test_scale_stored_moves_a_host_factor_to_counted_device():
    counted = torch.tensor([True, False, True], device="meta")
    grad = torch.ones(3, 2, device="meta")
    _rules.scale_stored(grad, torch.tensor(2.0), "mean", counted)
    assert grad.device.type == "meta" and grad.shape == (3, 2)
    # on the CPU: the rows not counted get a factor of 0 even for an infinite factor
    grad = torch.tensor([[0.5, -0.5], [0.25, -0.25], [1.0, 2.0]])
    _rules.scale_stored(grad, torch.tensor(INF), "sum", torch.tensor([True, False, True]))
    _close(grad, torch.tensor([[INF, -INF], [0.0, 0.0], [INF, INF]]))
    grad = torch.tensor([[0.5, -0.5]])
    _rules.scale_stored(grad, torch.tensor(1.0), "mean", torch.tensor([True]))
    _close(grad, torch.tensor([[0.5, -0.5]]))


# ---- 3. is_grads_batched=True in the row-block kernel and the CPU linear head
# (conftest.py: NATIVE_MAX_LOGITS = 0, every call takes the row-block kernel)


def _index_data(seed, ignored=(), dtype=torch.float32, scale=1.0):
    """``(z, t, g)``: (6, 5) logits, class indices with ``ignored`` rows at -100, and the
    generator that drew them (tests draw their grad_outputs from it next)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(6, 5, generator=g, dtype=dtype) * scale
    t = torch.randint(0, 5, (6,), generator=g)
    t[list(ignored)] = -100
    return z, t, g


def _batched(fn_ours, fn_ref, inputs, go, **kw):
    mine = [v.clone().requires_grad_() for v in inputs]
    ref = [v.clone().requires_grad_() for v in inputs]
    got = torch.autograd.grad(fn_ours(*mine), mine, go, is_grads_batched=True, **kw)
    want = torch.autograd.grad(fn_ref(*ref), ref, go, is_grads_batched=True)
    for a, e in zip(got, want, strict=True):
        _close(a, e)


def _spatial(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, 5, 4, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, 5, (3, 4), generator=g)
    t[0, 1] = t[2, 3] = -100
    go = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    go[0, 0, 0], go[1, 2, 3], go[1, 1, 1] = INF, NAN, -INF
    return z, t, go


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_batched_spatial_index_targets(reduction):
    z, t, go = _spatial()
    if reduction != "none":
        go = torch.tensor([2.0, INF, -0.5], dtype=torch.float64)
    _batched(lambda z: xt.cross_entropy(z, t, reduction=reduction),
             lambda z: F.cross_entropy(z, t, reduction=reduction), [z], go)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_batched_probability_target_and_weight_gradients(reduction):
    """The target's and the weight's gradients under is_grads_batched (recomputed)."""
    z, _, go = _spatial(1)
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(3, 5, 4, generator=g, dtype=torch.float64), 1)
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    if reduction != "none":
        go = torch.tensor([2.0, -0.5, 1.0], dtype=torch.float64)
    kw = {"reduction": reduction, "label_smoothing": 0.1}
    _batched(lambda z, p, w: xt.cross_entropy(z, p, w, **kw),
             lambda z, p, w: F.cross_entropy(z, p, w, **kw), [z, p, w], go)
    _batched(lambda p: xt.cross_entropy(z, p, **kw),
             lambda p: F.cross_entropy(z, p, **kw), [p], go)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_batched_float32_and_num_items(reduction):
    z, t, g = _index_data(3, ignored=(3,))
    if reduction == "none":
        go = torch.randn(3, 6, generator=g)
        go[1, 2] = INF
        _batched(lambda z: xt.cross_entropy(z, t, reduction="none"),
                 lambda z: F.cross_entropy(z, t, reduction="none"), [z], go)
        return
    go = torch.tensor([1.0, 2.0, INF, NAN])
    _batched(lambda z: xt.cross_entropy(z, t, num_items=4),
             lambda z: F.cross_entropy(z, t, reduction="sum") / 4, [z], go)


def test_batched_with_inplace_backward_is_refused_naming_both():
    z = torch.randn(6, 5, requires_grad=True)
    t = torch.randint(0, 5, (6,))
    loss = xt.cross_entropy(z * 1, t, inplace_backward=True)
    with pytest.raises(UnsupportedError, match=r"is_grads_batched.*inplace_backward"):
        torch.autograd.grad(loss, z, torch.tensor([1.0, 2.0]), is_grads_batched=True)


def test_retained_graph_batched_then_create_graph_then_plain():
    """A batched backward leaves the stored gradient; a create_graph backward after it
    gives torch's Hessian-vector product; float32: the plain backward consumes it once."""
    z, t, _ = _index_data(4, ignored=(0,), dtype=torch.float64)
    mine, ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss, want_loss = xt.cross_entropy(mine, t), F.cross_entropy(ref, t)
    gos = torch.tensor([1.0, -3.0], dtype=torch.float64)
    _close(torch.autograd.grad(loss, mine, gos, is_grads_batched=True, retain_graph=True)[0],
           torch.autograd.grad(want_loss, ref, gos, is_grads_batched=True,
                               retain_graph=True)[0])
    (gm,) = torch.autograd.grad(loss, mine, create_graph=True, retain_graph=True)
    (gr,) = torch.autograd.grad(want_loss, ref, create_graph=True, retain_graph=True)
    _close(torch.autograd.grad(gm.square().sum(), mine, retain_graph=True)[0],
           torch.autograd.grad(gr.square().sum(), ref, retain_graph=True)[0])
    _close(torch.autograd.grad(loss, mine)[0], torch.autograd.grad(want_loss, ref)[0])

    z32 = z.float()
    mine = z32.clone().requires_grad_()
    loss = xt.cross_entropy(mine, t)
    torch.autograd.grad(loss, mine, gos.float(), is_grads_batched=True, retain_graph=True)
    ref = z32.clone().requires_grad_()
    _close(torch.autograd.grad(loss, mine, retain_graph=True)[0],
           torch.autograd.grad(F.cross_entropy(ref, t), ref)[0])
    with pytest.raises(RuntimeError, match="backward ran twice"):
        torch.autograd.grad(loss, mine)


@pytest.mark.parametrize("linear", [False, True])
def test_in_place_change_before_a_batched_backward_names_batched_grad_outputs(linear):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 5, generator=g, requires_grad=True)
    t = torch.randint(0, 5, (6,), generator=g)
    y = z * 1
    loss = (xt.linear_cross_entropy(y, torch.randn(7, 5, generator=g), t) if linear
            else xt.cross_entropy(y, t))
    y.add_(1.0)
    with pytest.raises(RuntimeError, match=r"modified in place.*batched grad_outputs"):
        torch.autograd.grad(loss, z, torch.tensor([1.0, 2.0]), is_grads_batched=True)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_batched_linear_head_every_row_ignored_and_bias(reduction):
    x, w, b, _ = _linear_data(10)
    t = torch.full((6,), -100)
    go = (torch.randn(2, 6, dtype=torch.float64) if reduction == "none"
          else torch.tensor([2.0, INF], dtype=torch.float64))
    _batched(lambda x, w, b: _ours_linear(x, w, b, t, reduction),
             lambda x, w, b: _torch_linear(x, w, b, t, reduction), [x, w, b], go)


def test_batched_backward_from_four_threads(workers):
    g = torch.Generator().manual_seed(6)
    z = torch.randn(8, 5, generator=g, dtype=torch.float64)
    t = torch.randint(0, 5, (8,), generator=g)
    gos = torch.tensor([1.0, 2.0, INF], dtype=torch.float64)
    ref = z.clone().requires_grad_()
    want = torch.autograd.grad(F.cross_entropy(ref, t, label_smoothing=0.2), ref, gos,
                               is_grads_batched=True)[0]
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                leaf = z.clone().requires_grad_()
                loss = xt.cross_entropy(leaf, t, label_smoothing=0.2)
                results.append(torch.autograd.grad(loss, leaf, gos, is_grads_batched=True)[0])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors and len(results) == 12
    for r in results:
        _close(r, want)


def test_batched_with_statistics_softcap_and_bfloat16():
    z, t, g = _index_data(16, ignored=(1,), dtype=torch.float64, scale=3.0)
    gos = torch.tensor([1.0, 2.0, INF], dtype=torch.float64)
    mine, ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss, _ = xt.cross_entropy(mine, t, statistics=("lse", "entropy"))
    _close(torch.autograd.grad(loss, mine, gos, is_grads_batched=True)[0],
           torch.autograd.grad(F.cross_entropy(ref, t), ref, gos, is_grads_batched=True)[0])
    cap = 5.0
    go = torch.randn(2, 6, generator=g, dtype=torch.float64)
    _batched(lambda z: xt.cross_entropy(z, t, softcap=cap, reduction="none"),
             lambda z: F.cross_entropy(cap * torch.tanh(z / cap), t, reduction="none"),
             [z], go)
    # bfloat16 logits: float32 arithmetic, the gradient rounded once (crossent's rule)
    zb = z.to(torch.bfloat16)
    mine, ref = zb.clone().requires_grad_(), zb.float().requires_grad_()
    loss = xt.cross_entropy(mine, t)
    (got,) = torch.autograd.grad(loss, mine, gos[:2].to(loss.dtype), is_grads_batched=True)
    (want,) = torch.autograd.grad(F.cross_entropy(ref, t), ref, gos[:2].float(),
                                  is_grads_batched=True)
    assert got.dtype == torch.bfloat16
    _close(got, want.to(torch.bfloat16))


def test_vectorized_jacobians_and_hessians():
    """torch.autograd.functional's vectorize=True sends batched grad_outputs (and, for the
    Hessian, a batched create_graph backward)."""
    from torch.autograd.functional import hessian, jacobian

    g = torch.Generator().manual_seed(17)
    z = torch.randn(4, 5, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, 5, (4,), generator=g)
    t[1] = -100
    for reduction in ("none", "mean"):
        kw = {"reduction": reduction, "label_smoothing": 0.1}
        _close(jacobian(lambda z, kw=kw: xt.cross_entropy(z, t, **kw), z, vectorize=True),
               jacobian(lambda z, kw=kw: F.cross_entropy(z, t, **kw), z, vectorize=True))
    _close(hessian(lambda z: xt.cross_entropy(z, t), z, vectorize=True),
           hessian(lambda z: F.cross_entropy(z, t), z, vectorize=True))
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64)
    _close(hessian(lambda x: xt.linear_cross_entropy(x, w, t), x, vectorize=True),
           hessian(lambda x: F.cross_entropy(F.linear(x, w), t), x, vectorize=True))
    _close(jacobian(lambda w: xt.linear_cross_entropy(x, w, t, reduction="none"), w,
                    vectorize=True),
           jacobian(lambda w: F.cross_entropy(F.linear(x, w), t, reduction="none"), w,
                    vectorize=True))


# ---- 4. the route "small": choose_backend and the checked path


def _call(**kw):
    base = dict(function="cross_entropy", device=torch.device("cpu"), num_logits=300_000,
                index_target=True, z_loss=0.0, softcap=None, dtype=torch.float32,
                needs_grad=True, plain=True)
    base.update(kw)
    return _backends.Call(**base)


def test_choose_backend_small_only_for_its_calls():
    limit = 1 << 19
    assert _backends.choose_backend("auto", _call(), limit) == "small"
    assert _backends.choose_backend("auto", _call(dtype=torch.float64), limit) == "small"
    assert _backends.choose_backend("auto", _call(dtype=torch.bfloat16), limit) == "small"
    native = [dict(device=torch.device("cuda")), dict(device=torch.device("meta")),
              dict(dtype=torch.float16), dict(needs_grad=False),
              dict(plain=False), dict(weighted=True), dict(label_smoothing=0.1),
              dict(function="linear_cross_entropy"),
              dict(num_logits=_backends.SMALL_MIN_LOGITS - 1)]
    for change in native:
        assert _backends.choose_backend("auto", _call(**change), limit) == "native", change
    assert _backends.choose_backend("native", _call(), limit) == "native"
    assert _backends.choose_backend("rowblock", _call(), limit) == "rowblock"
    assert _backends.choose_backend("auto", _call(num_logits=limit), limit) == "rowblock"
    for change in (dict(index_target=False), dict(z_loss=1e-4), dict(softcap=30.0),
                   dict(sized=True)):
        assert _backends.choose_backend("auto", _call(**change), limit) == "rowblock", change
    assert _backends.choose_backend("auto", _call(composite="C = 0"), limit) == "composite"
    # the threshold: 0 logits never take it, even with SMALL_MIN_LOGITS lowered to 0
    assert not _backends.small_kernel_fits(torch.device("cpu"), torch.float32, 0, True, 0.0)


@pytest.fixture
def small_route(monkeypatch):
    """Small shapes take the small route (and torch's kernel serves what it does not)."""
    monkeypatch.setattr(_backends, "NATIVE_MAX_LOGITS", 1 << 19)
    monkeypatch.setattr(_backends, "SMALL_MIN_LOGITS", 1)


def _spy_small(monkeypatch):
    calls = []
    real = _small._SmallCrossEntropy.apply

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(_small._SmallCrossEntropy, "apply", spy)
    return calls


@pytest.mark.parametrize("target_dtype, ignore_index",
                         [(torch.int8, -1), (torch.uint8, 255), (torch.int32, -100),
                          (torch.int16, 3), (torch.uint16, 4)])
def test_small_route_narrow_targets_and_ignore_index(target_dtype, ignore_index,
                                                     small_route, monkeypatch):
    calls = _spy_small(monkeypatch)
    g = torch.Generator().manual_seed(11)
    z = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    t = torch.randint(0, 6, (2, 3), generator=g)
    t[0, 2] = ignore_index
    for reduction in ("none", "mean", "sum"):
        leaf, ref = z.clone().requires_grad_(), z.clone().requires_grad_()
        loss = xt.cross_entropy(leaf, t.to(target_dtype), ignore_index=ignore_index,
                                reduction=reduction, loss_dtype=torch.float64)
        want = F.cross_entropy(ref, t, ignore_index=ignore_index, reduction=reduction)
        assert loss.shape == want.shape and loss.dtype == want.dtype
        go = torch.randn(want.shape, generator=g, dtype=torch.float64)
        loss.backward(go)
        want.backward(go)
        _close(loss.detach(), want.detach())
        _close(leaf.grad, ref.grad)
    assert len(calls) == 3


def test_small_route_bool_target_raises_as_the_native_route(small_route):
    z = torch.randn(4, 3, requires_grad=True)
    t = torch.tensor([True, False, True, True])
    with pytest.raises(InputError, match="target"):
        xt.cross_entropy(z, t, loss_dtype=torch.float32)
    with pytest.raises(InputError, match="target"):
        xt.cross_entropy(z, t, loss_dtype=torch.float32, backend="native")


def test_small_route_out_of_range_index_on_the_checked_path(small_route, monkeypatch):
    calls = _spy_small(monkeypatch)
    z = torch.randn(2, 3, 4, requires_grad=True)
    t = torch.tensor([[0, 1, 2, 3], [1, 1, 1, 1]], dtype=torch.int32)  # 3 >= C
    with pytest.raises(IndexError):
        xt.cross_entropy(z, t)
    with pytest.raises(IndexError):
        xt.cross_entropy(z, t.long(), num_items=2)
    assert calls == []


def test_small_route_unbatched_input_statistics_and_num_items(small_route, monkeypatch):
    calls = _spy_small(monkeypatch)
    z = torch.randn(7, dtype=torch.float64)
    t = torch.tensor(4)
    for reduction in ("none", "mean", "sum"):
        leaf, ref = z.clone().requires_grad_(), z.clone().requires_grad_()
        loss, stats = xt.cross_entropy(leaf, t, reduction=reduction,
                                       statistics=("lse", "target_logprob", "accuracy"))
        want = F.cross_entropy(ref, t, reduction=reduction)
        assert loss.shape == want.shape == ()
        assert stats.lse.shape == stats.accuracy.shape == stats.counted.shape == ()
        _close(stats.lse, torch.logsumexp(z, 0))
        _close(stats.target_logprob, torch.log_softmax(z, 0)[4])
        assert bool(stats.accuracy) == (int(z.argmax()) == 4)
        loss.backward(torch.tensor(-1.5, dtype=torch.float64))
        want.backward(torch.tensor(-1.5, dtype=torch.float64))
        _close(loss.detach(), want.detach())
        _close(leaf.grad, ref.grad)
    leaf, ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = xt.cross_entropy(leaf, t, num_items=torch.tensor(2.5, dtype=torch.float64))
    want = F.cross_entropy(ref, t, reduction="sum") / 2.5
    loss.backward()
    want.backward()
    _close(loss.detach(), want.detach())
    _close(leaf.grad, ref.grad)
    assert len(calls) == 4


def test_small_route_spatial_none_with_batched_grad_outputs(small_route, monkeypatch):
    calls = _spy_small(monkeypatch)
    z, t, go = _spatial(7)
    for target in (t, t.to(torch.int32)):
        mine = z.clone().requires_grad_()
        loss = xt.cross_entropy(mine, target, reduction="none", loss_dtype=torch.float64)
        assert _uses(loss, "SmallCrossEntropy")
        ref = z.clone().requires_grad_()
        want = F.cross_entropy(ref, t, reduction="none")
        _close(torch.autograd.grad(loss, mine, go, is_grads_batched=True)[0],
               torch.autograd.grad(want, ref, go, is_grads_batched=True)[0])
    mine = z.clone().requires_grad_()
    loss = xt.cross_entropy(mine, t, num_items=5)
    gos = torch.tensor([1.0, INF, -2.0], dtype=torch.float64)
    ref = z.clone().requires_grad_()
    want = F.cross_entropy(ref, t, reduction="sum") / 5
    _close(torch.autograd.grad(loss, mine, gos, is_grads_batched=True)[0],
           torch.autograd.grad(want, ref, gos, is_grads_batched=True)[0])
    assert len(calls) == 3


def test_calls_the_small_route_must_not_take_keep_torchs_numbers(small_route, monkeypatch):
    calls = _spy_small(monkeypatch)
    g = torch.Generator().manual_seed(12)
    z = torch.randn(5, 4, generator=g)
    t = torch.randint(0, 4, (5,), generator=g)

    class Sub(torch.Tensor):
        pass

    # a target subclass (the input plain): torch's kernel
    leaf = z.clone().requires_grad_()
    loss = xt.cross_entropy(leaf, t.as_subclass(Sub), num_items=5)
    loss.backward()
    ref = z.clone().requires_grad_()
    (F.cross_entropy(ref, t, reduction="sum") / 5).backward()
    _close(leaf.grad, ref.grad)
    # meta tensors: torch's kernel's shapes and dtypes
    zm = torch.empty(5, 4, device="meta", requires_grad=True)
    for kw in ({"num_items": 2}, {"reduction": "none", "loss_dtype": torch.float64}):
        out = xt.cross_entropy(zm, t.to("meta"), **kw)
        assert out.device.type == "meta"
        want_shape = (5,) if kw.get("reduction") == "none" else ()
        assert out.shape == want_shape
    # no rows: torch's NaN mean and an empty gradient
    empty = torch.empty(0, 4, requires_grad=True)
    out = xt.cross_entropy(empty, torch.empty(0, dtype=torch.int32), loss_dtype=torch.float32)
    assert math.isnan(float(out.detach()))
    out.backward()
    assert empty.grad.shape == (0, 4)
    # a gradient for a float64 logits tensor under no_grad: only the loss
    with torch.no_grad():
        out = xt.cross_entropy(z.double().requires_grad_(), t, num_items=5)
    assert not out.requires_grad
    _close(out, F.cross_entropy(z.double(), t, reduction="sum") / 5)
    assert calls == []


# ---- 5. nan_at_targets through the row-block kernel's backward


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("ignored", [(), (0, 3), tuple(range(6))])
def test_rowblock_infinite_grad_output_nan_at_targets(reduction, ignored):
    z, t, _ = _index_data(13, ignored=ignored, scale=4.0)
    if reduction == "none":
        gos = [torch.tensor([INF, -INF, NAN, 1.0, INF, 0.0]),
               torch.tensor(INF).expand(6), torch.full((6,), -INF)[::1]]
    else:
        gos = [torch.tensor(v) for v in (INF, -INF, NAN)]
    for go in gos:
        mine, ref = z.clone().requires_grad_(), z.clone().requires_grad_()
        xt.cross_entropy(mine, t, reduction=reduction).backward(go)
        F.cross_entropy(ref, t, reduction=reduction).backward(go)
        _close(mine.grad, ref.grad)


def test_rowblock_infinite_grad_output_spatial_rows_in_order():
    """(N, C, d): the flattened rows and grad_output.reshape(-1) line up."""
    z, t, _ = _spatial(14)
    go = torch.ones(3, 4, dtype=torch.float64)
    go[0, 2], go[2, 0], go[1, 3] = INF, -INF, NAN
    mine, ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    xt.cross_entropy(mine, t, reduction="none").backward(go)
    F.cross_entropy(ref, t, reduction="none").backward(go)
    _close(mine.grad, ref.grad)
    mine, ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    xt.cross_entropy(mine, t, reduction="none").backward(go.t().contiguous().t())
    F.cross_entropy(ref, t, reduction="none").backward(go.t().contiguous().t())
    _close(mine.grad, ref.grad)


def test_nan_at_targets_direct():
    grad = torch.tensor([[0.1, -0.9], [-0.5, 0.5], [0.3, -0.3]])
    valid = torch.tensor([True, False, True])
    index = torch.tensor([[1], [0], [1]])
    g = grad.clone()
    _rules.nan_at_targets(g, torch.tensor([INF, INF, 2.0]), valid, index, "none")
    _close(g, torch.tensor([[0.1, NAN], [-0.5, 0.5], [0.3, -0.3]]))
    g = grad.clone()
    _rules.nan_at_targets(g, torch.tensor(-INF), valid, index, "mean")
    _close(g, torch.tensor([[0.1, NAN], [-0.5, 0.5], [0.3, NAN]]))
    g = grad.clone()
    _rules.nan_at_targets(g, torch.tensor(1e38), valid, index, "sum")
    assert torch.equal(g, grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_rowblock_float64_loss_of_float32_logits_rounds_grad_output_like_torch(reduction):
    z, t, _ = _index_data(15, ignored=(1,))
    go = (torch.tensor(1e300, dtype=torch.float64) if reduction == "mean"
          else torch.tensor([1e300, 1.0, 2.0, -1e39, 0.0, 3.0], dtype=torch.float64))
    mine, ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = xt.cross_entropy(mine, t, reduction=reduction, loss_dtype=torch.float64,
                            backend="rowblock")
    assert loss.dtype == torch.float64
    loss.backward(go)
    F.cross_entropy(ref, t, reduction=reduction).double().backward(go)
    _close(mine.grad, ref.grad)


@pytest.mark.parametrize("linear", [False, True])
def test_meta_tensors_on_the_fused_routes_give_shapes_or_refuse_by_name(linear):
    x = torch.empty(4, 3, device="meta", requires_grad=True)
    t = torch.zeros(4, dtype=torch.long, device="meta")
    try:
        out = (xt.linear_cross_entropy(x, torch.empty(5, 3, device="meta"), t) if linear
               else xt.cross_entropy(x, t, backend="rowblock"))
    except UnsupportedError as e:
        assert "meta" in str(e)
        return
    assert out.device.type == "meta" and out.shape == ()


@pytest.mark.parametrize("backend", ["auto", "rowblock"])
def test_inference_mode_with_enable_grad_records_no_graph(backend, small_route):
    z = torch.randn(5, 4, requires_grad=True)
    t = torch.randint(0, 4, (5,))
    with torch.inference_mode(), torch.enable_grad():
        want = F.cross_entropy(z, t)
        got = xt.cross_entropy(z, t, backend=backend)
    assert not want.requires_grad
    _close(got.detach(), want)
    assert got.requires_grad == want.requires_grad


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("nan_features", [False, True])
def test_linear_head_none_nan_grad_output_on_ignored_rows_leaves_them_as_torch(chunk_size,
                                                                          nan_features):
    """reduction="none": a NaN or infinite grad_output on an ignored row does not reach its
    dx (torch forms nothing there); an ignored row with NaN features is NaN in both (its
    softmax is NaN: torch's exp(logp) * 0). Found by H20: ``scale * row_multiplier`` made
    the ignored row's 0 a NaN and counted it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    if nan_features:
        x[3] = math.nan
    t = torch.tensor([1, 2, -100, -100, 0, 1, 2])
    go = torch.ones(7, dtype=torch.float64)
    go[2:] = math.nan
    go[4] = math.inf
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    wa, wb = w.clone().requires_grad_(), w.clone().requires_grad_()
    loss = xt.linear_cross_entropy(xa, wa, t, reduction="none", chunk_size=chunk_size,
                                   backend="rowblock")
    loss.backward(go)
    F.cross_entropy(F.linear(xb, wb), t, reduction="none").backward(go)
    torch.testing.assert_close(xa.grad, xb.grad, equal_nan=True)
    torch.testing.assert_close(wa.grad, wb.grad, equal_nan=True)
