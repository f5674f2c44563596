"""The vocab-parallel functions without torch.distributed initialized (world = 1) and their
argument checks: fast, no processes spawned."""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_group

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError
from crossent.torch.distributed import (
    global_num_items,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(0)
    full = torch.randn(16, 50, generator=g) * 4
    t = torch.randint(0, 50, (16,), generator=g)
    t[3] = -100
    low = full.to(dtype)
    a = low.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(a, t, label_smoothing=0.1, z_loss=1e-3)
    loss.backward()
    ref_in = low.float().requires_grad_()  # float32 on the same (rounded) logits
    ref = xt.cross_entropy(ref_in, t, label_smoothing=0.1, z_loss=1e-3)
    ref.backward()
    assert loss.dtype == dtype and a.grad.dtype == dtype
    torch.testing.assert_close(loss, ref.to(dtype))
    torch.testing.assert_close(a.grad, ref_in.grad.to(dtype))  # rounded once, from float32


def test_no_grad_and_options_single_process():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 9, generator=g)
    t = torch.randint(0, 9, (7,), generator=g)
    w = torch.rand(9, generator=g)
    with torch.no_grad():
        got = vocab_parallel_cross_entropy(x, t, weight=w, reduction="sum", num_items=5)
    want = xt.cross_entropy(x, t, w, reduction="sum") / 5
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


BAD_ARGUMENTS = [  # (keyword arguments, what the message must say)
    (dict(reduction="avg"), "reduction"),
    (dict(reduction="mean", num_items=3), "num_items"),
    (dict(reduction="sum", num_items=0), "num_items"),
    (dict(reduction="sum", num_items=-2.0), "num_items"),
    (dict(reduction="sum", num_items=float("nan")), "num_items"),
    (dict(reduction="sum", num_items=torch.tensor(0)), r"num_items=0\.0 must be"),
    (dict(reduction="sum", num_items=torch.tensor([1, 2])), "num_items"),
    (dict(reduction="sum", num_items="3"), "num_items"),
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(label_smoothing=None), "label_smoothing"),
    (dict(z_loss=-1.0), "z_loss"),
    (dict(softcap=0.0), "softcap"),
    (dict(softcap=-2.0), "softcap"),
    (dict(ignore_index=3.7), "ignore_index"),
    (dict(ignore_index=None), "ignore_index"),
    (dict(ignore_index=2 ** 70), "ignore_index"),
    (dict(target=torch.tensor([0, 1, 2, 5])), r"class index 5, outside \[0, 5\)"),
    (dict(target=torch.tensor([0, 1, 2, -3])), "class index -3"),
    (dict(target=torch.tensor([0, 1, 2, 2 ** 40])), f"class index {2 ** 40},"),
    (dict(weight=torch.ones(4)), "weight has shape"),
    (dict(weight=torch.ones(5, dtype=torch.float64)), "weight has dtype"),
    (dict(weight=[1.0] * 5), "weight must be a floating tensor"),
    (dict(target=torch.tensor([0, 1, 2])), r"target has shape \(3,\); expected \(4,\)"),
    (dict(target=torch.tensor([[0, 1], [2, 3]])), "target has shape"),
    (dict(target=torch.tensor([0.0, 1, 2, 3])), "integer class ids"),
    (dict(target=[0, 1, 2, 3]), "target must be a tensor"),
    (dict(vocab_start=2), r"gap: classes \[0, 2\)"),
    (dict(vocab_start=-1), "vocab_start=-1 must be >= 0"),
    (dict(vocab_start=1.0), "vocab_start=1.0 must be an integer"),
    (dict(logits=torch.zeros(4, 5, dtype=torch.int64)), "local_logits must be floating"),
    (dict(logits=torch.tensor(1.0)), "0-d"),
    (dict(logits=None), "local_logits must be a tensor"),
]


@pytest.mark.parametrize("kwargs, message", BAD_ARGUMENTS,
                         ids=[f"{i}-{next(iter(k))}" for i, (k, _) in enumerate(BAD_ARGUMENTS)])
def test_argument_errors(kwargs, message):
    """Each bad argument raises crossent.InputError (a ValueError) naming it."""
    kwargs = dict(kwargs)
    x = kwargs.pop("logits", torch.randn(4, 5))
    t = kwargs.pop("target", torch.tensor([0, 1, 2, 3]))
    with pytest.raises(InputError, match=message):
        vocab_parallel_cross_entropy(x, t, **kwargs)


LINEAR_BAD = [
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=2.5), "chunk_size"),
    (dict(reduce_input_grad="yes"), "reduce_input_grad"),
    (dict(w=torch.randn(6, 5, dtype=torch.float64)), "local_weight has dtype"),
    (dict(local_bias=torch.zeros(6, dtype=torch.float64)), "local_bias has dtype"),
    (dict(local_bias=torch.zeros(5)), "local_bias has shape"),
    (dict(w=torch.randn(6, 4)), "does not match local_weight"),
    (dict(w=torch.randn(6)), r"local_weight must be \(V_r, D\)"),
    (dict(x=torch.zeros(4, 5, dtype=torch.int32)), "input must be a floating tensor"),
    (dict(reduction="sum", num_items=-1), "num_items"),
]


@pytest.mark.parametrize("kwargs, message", LINEAR_BAD,
                         ids=[f"{i}-{next(iter(k))}" for i, (k, _) in enumerate(LINEAR_BAD)])
def test_linear_argument_errors(kwargs, message):
    kwargs = dict(kwargs)
    x = kwargs.pop("x", torch.randn(4, 5))
    w = kwargs.pop("w", torch.randn(6, 5))
    with pytest.raises(InputError, match=message):
        vocab_parallel_linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 3]), **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softcap_matches_crossent_torch(reduction):
    """softcap caps each logit (each rank its own slice); float64 against crossent.torch,
    loss and every gradient; the caller's logits are left intact."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 9, generator=g, dtype=torch.float64) * 5
    t = torch.randint(0, 9, (7,), generator=g)
    t[2] = -100
    opts = dict(softcap=3.0, z_loss=0.01, label_smoothing=0.1, reduction=reduction)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = vocab_parallel_cross_entropy(a, t, **opts), xt.cross_entropy(b, t, **opts)
    go = torch.rand(want.shape, generator=g, dtype=torch.float64)
    got.backward(go)
    want.backward(go)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(a.detach(), x)
    h = torch.randn(7, 4, generator=g, dtype=torch.float64)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64) * 3
    p = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    q = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    got = vocab_parallel_linear_cross_entropy(*p, t, chunk_size=3, **opts)
    want = xt.linear_cross_entropy(*q, t, **opts)
    got.backward(go)
    want.backward(go)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for u, v in zip(p, q, strict=True):
        torch.testing.assert_close(u.grad, v.grad, rtol=1e-12, atol=1e-12)


def test_class_weight_requiring_grad_is_refused_loudly():
    """torch computes d loss / d weight; the vocab-parallel functions do not, so they refuse
    (after the agreement collective, so the other ranks raise too) instead of detaching."""
    w = torch.ones(5, requires_grad=True)
    with pytest.raises(UnsupportedError, match="class weight"):
        vocab_parallel_cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), weight=w)
    with torch.no_grad():
        vocab_parallel_cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), weight=w)


def test_group_errors():
    with pytest.raises(InputError, match="not initialized"):
        global_num_items(torch.tensor([1]), group=object())
    with pytest.raises(InputError, match="not initialized"):
        vocab_parallel_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), group=object())
    with pytest.raises(InputError, match="empty list"):
        global_num_items([])


def test_linear_backward_twice_raises():
    x = torch.randn(4, 3, requires_grad=True)
    loss = vocab_parallel_linear_cross_entropy(x, torch.randn(5, 3), torch.tensor([0, 1, 2, 3]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def _vocab_parallel_loss(linear: bool, seed: int):
    """``(x, w, t, loss)``: a world-1 vocab-parallel loss of ``x`` (requires grad), through
    the linear head or the logits ``x @ w.T``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, generator=g, requires_grad=True)
    w = torch.randn(7, 4, generator=g)
    t = torch.randint(0, 7, (6,), generator=g)
    loss = (vocab_parallel_linear_cross_entropy(x, w, t) if linear
            else vocab_parallel_cross_entropy(x @ w.T, t))
    return x, w, t, loss


@pytest.mark.parametrize("linear", [False, True])
def test_double_backward_is_refused_not_a_constant(linear):
    """create_graph=True would otherwise return a gradient without grad_fn: a Hessian of 0
    or a gradient penalty missing its logits term, silently."""
    x, w, t, loss = _vocab_parallel_loss(linear, seed=5)
    with pytest.raises(UnsupportedError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    # a plain backward still works
    loss = (vocab_parallel_linear_cross_entropy(x, w, t) if linear
            else vocab_parallel_cross_entropy(x @ w.T, t))
    (gx,) = torch.autograd.grad(loss, x)
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(x @ w.T, t), x)[0]
    torch.testing.assert_close(gx, ref)


def test_global_num_items_local():
    assert int(global_num_items(torch.tensor([[1, -100], [2, 3]]))) == 3
    assert int(global_num_items([torch.tensor([-1, 0]), torch.tensor([4])],
                                ignore_index=-1)) == 2


def _sleep_forever(rank, world):
    import time

    time.sleep(3600)


def test_harness_kills_a_hung_group_and_fails_clearly():
    """A child that never returns (as a rank stuck in a collective would) is killed at the
    deadline and the test fails with TimeoutError instead of hanging CI."""
    with pytest.raises(TimeoutError, match="did not finish"):
        run_group(_sleep_forever, 2, timeout=4)


def test_scaling_doc_shows_the_cost_table_the_code_prints():
    from pathlib import Path

    from crossent.torch.distributed import costs

    doc = (Path(__file__).resolve().parents[3] / "docs" / "scaling.md").read_text()
    rows = [r for r in costs.table().splitlines() if r.startswith("|")]
    assert len(rows) > 5
    for row in rows:
        assert row in doc, row


def test_class_ids_above_2_to_the_24_are_exact():
    """The checks are int64: a class id above 2^24 (not exact in float32) is accepted when
    in range and reported exactly when not (issue 11 item 9)."""
    num_classes = (1 << 24) + 8
    logits = torch.zeros(1, num_classes)
    logits[0, -3] = 2.0
    t = torch.tensor([num_classes - 3])
    got = vocab_parallel_cross_entropy(logits, t)
    want = torch.logsumexp(logits.double(), 1)[0] - 2.0
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(InputError, match=f"class index {num_classes + 1},"):
        vocab_parallel_cross_entropy(logits, torch.tensor([num_classes + 1]))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("linear", [False, True])
def test_nan_grad_output_leaves_ignored_rows_as_torch(reduction, linear):
    """A NaN grad_output: NaN on counted rows, the ignored rows' input gradient 0 (torch
    forms nothing there); against torch autograd."""
    import math

    import torch.nn.functional as F

    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 4, generator=g), torch.randn(7, 4, generator=g)
    t = torch.tensor([0, -100, 3, -100, 6, 1])
    ours = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    ref = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    if linear:
        loss = vocab_parallel_linear_cross_entropy(*ours, t, reduction=reduction)
    else:
        loss = vocab_parallel_cross_entropy(F.linear(*ours), t, reduction=reduction)
    loss_ref = F.cross_entropy(F.linear(*ref), t, reduction=reduction)
    go = torch.tensor(math.nan)
    loss.backward(go)
    loss_ref.backward(go)
    for a, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, r.grad, equal_nan=True)


@pytest.mark.parametrize("which", ["local_logits", "target", "input"])
def test_sparse_tensors_are_refused_naming_the_layout(which):
    g = torch.Generator().manual_seed(4)
    z, t = torch.randn(5, 6, generator=g), torch.randint(0, 6, (5,), generator=g)
    with pytest.raises(UnsupportedError, match=f"{which} with layout torch.sparse_coo"):
        if which == "input":
            vocab_parallel_linear_cross_entropy(torch.randn(5, 3).to_sparse(),
                                                torch.randn(6, 3), t)
        elif which == "target":
            vocab_parallel_cross_entropy(z, t.to_sparse())
        else:
            vocab_parallel_cross_entropy(z.to_sparse(), t)


@pytest.mark.parametrize("linear", [False, True])
def test_batched_grad_outputs_are_refused_naming_them(linear):
    """``is_grads_batched=True`` runs backward under torch's vmap, where the vocab-parallel
    backward's host reads have no batching rule: refused by name, not an obscure vmap
    error; a plain backward of the same loss still works."""
    x, _, _, loss = _vocab_parallel_loss(linear, seed=6)
    with pytest.raises(UnsupportedError, match="is_grads_batched"):
        torch.autograd.grad(loss, x, torch.tensor([1.0, 2.0]), is_grads_batched=True)
