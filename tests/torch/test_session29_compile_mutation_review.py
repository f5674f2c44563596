"""Review H110: mutation testing of the torch.compile layer (crossent.torch._custom_ops).

Each test here kills a mutation of ``_custom_ops.py`` that the compile suites let live
(no existing test failed): the compiled linear head's ``dW``/``db`` under a non-finite
``grad_output`` with finite features (the existing head tests put a NaN row in ``x``,
which makes torch's and the stored ``dW`` all NaN and hides the factor), the grad_output
rounding of the head, and a z-loss row whose logsumexp is exactly 0. References: torch
(``F.cross_entropy`` of ``F.linear``, torch's z-loss formula) and, where the claim is
compiled == eager, eager crossent. H110-1 (the eager head, fixed at stop 38) is a plain
test now."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_compile_grad_output import (  # the same fixture and comparison
    IGNORE,
    _compiled,
    _fresh_dynamo,  # noqa: F401  (autouse: dynamo reset around each test)
    assert_same,
)

import crossent.torch as xt


def _same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """:func:`assert_same` (NaN and inf patterns, finite values close) and the dtype."""
    assert got.dtype == want.dtype, what
    assert_same(got, want, what)


def _grads(fn, inputs, target, grad_output, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    fn(*leaves, target, **kwargs).backward(grad_output)
    return [t.grad for t in leaves]


def _head(x, w, b, target, **kwargs):
    return xt.linear_cross_entropy(x, w, target, b, **kwargs)


def _torch_head(x, w, b, target, reduction="sum", label_smoothing=0.0):
    return F.cross_entropy(F.linear(x, w, b), target, reduction=reduction,
                           label_smoothing=label_smoothing)


def _finite_head_inputs():
    g = torch.Generator().manual_seed(110)
    return [torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g),
            torch.randn(4, generator=g)]


# ---- the head's dW/db factor (mutants: label smoothing not whole-row, no counted.any(0))


def test_head_label_smoothing_infinite_grad_output_dw_db_are_torchs_nan():
    """Label smoothing, index targets, finite features: every class's dlogits of a counted
    row holds ``inf - inf``, so torch's dW and db are all NaN (the compiled head's must be
    too, not the stored ones times inf = +-inf)."""
    inputs = _finite_head_inputs()
    target = torch.tensor([1, 2, IGNORE, 0, 3, 1])
    go = torch.tensor(math.inf)
    want = _grads(_torch_head, inputs, target, go, label_smoothing=0.1)
    assert want[1].isnan().all() and want[2].isnan().all()  # the reference's claim
    got = _grads(_compiled(_head), inputs, target, go, reduction="sum", label_smoothing=0.1)
    for i, name in enumerate(("dx", "dW", "db")):
        _same(got[i], want[i], f"{name} vs torch")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_head_no_row_counted_non_finite_grad_output_dw_db_are_torchs_zeros(value):
    """Every row ignored (finite features): torch forms no dlogits, so dx, dW, db are 0
    under a NaN or infinite grad_output (not the stored zeros times NaN)."""
    inputs = _finite_head_inputs()
    target = torch.full((6,), IGNORE)
    go = torch.tensor(value)
    want = _grads(_torch_head, inputs, target, go)
    assert all(bool((g == 0).all()) for g in want)  # the reference's claim
    got = _grads(_compiled(_head), inputs, target, go, reduction="sum")
    for i, name in enumerate(("dx", "dW", "db")):
        _same(got[i], want[i], f"{name} vs torch, grad_output {value}")


# ---- a float64 loss of float32 features: grad_output rounded to float32 first
# (docs/guarantees.md: "a float64 1e300 is inf"; mutant: no cast in _scale_head_grads)


def _float32_head_dx_at_inf(inputs, target):
    """torch's dx for the rule's grad_output: float32 torch with grad_output inf."""
    return _grads(_torch_head, inputs, target, torch.tensor(math.inf))[0]


def test_compiled_head_float64_loss_huge_grad_output_dx_is_torchs_at_inf():
    """The compiled head (dx stored in forward, scaled in backward) rounds a float64
    grad_output of 1e300 to float32's inf first: dx NaN on counted rows, 0 on the ignored
    one, as torch's float32 head under grad_output inf (not 1e300 times the stored dx in
    float64, rounded afterwards: +-inf)."""
    inputs = _finite_head_inputs()
    target = torch.tensor([1, 2, IGNORE, 0, 3, 1])
    want = _float32_head_dx_at_inf(inputs, target)
    assert want[target != IGNORE].isnan().all() and (want[2] == 0).all()  # the claim
    go = torch.tensor(1e300, dtype=torch.float64)
    got = _grads(_compiled(_head), inputs, target, go, reduction="sum",
                 loss_dtype=torch.float64)[0]
    _same(got, want, "dx vs torch float32 at inf")


@pytest.mark.fixed_bug("H110-1: the eager head did not round a float64 grad_output to float32")
def test_eager_head_float64_loss_huge_grad_output_dx_is_torchs_at_inf():
    """H110-1 (fixed at stop 38): the eager linear head (fused route) did not round a
    float64 grad_output to float32 first under loss_dtype=float64: 1e300 gave dx +-inf
    where inf (the documented rounding) gives NaN on counted rows."""
    inputs = _finite_head_inputs()
    target = torch.tensor([1, 2, IGNORE, 0, 3, 1])
    want = _float32_head_dx_at_inf(inputs, target)
    go = torch.tensor(1e300, dtype=torch.float64)
    got = _grads(_head, inputs, target, go, reduction="sum", loss_dtype=torch.float64)[0]
    _same(got, want, "eager dx vs torch float32 at inf")


# ---- z_loss: a row whose logsumexp is exactly 0 (mutant: z_loss * lse < 0)


def test_z_loss_row_with_zero_logsumexp_infinite_grad_output_is_torchs_formula():
    """torch's ``z_loss * lse**2`` term adds ``inf * 2 z_loss lse p_j = inf * 0 = NaN`` to
    every entry of a counted row whose lse is exactly 0 under an infinite grad_output: the
    whole row NaN (the ``<= 0`` of ``_z_loss_whole_rows``), as torch's formula and eager."""
    half = math.log(0.5)
    z = torch.tensor([[half, half], [0.3, -1.0], [2.0, 1.0]])
    assert torch.logsumexp(z, 1)[0].item() == 0.0
    target = torch.tensor([0, 1, 0])
    zl = 1e-3

    def reference(a, b):
        return (F.cross_entropy(a, b, reduction="sum")
                + zl * (torch.logsumexp(a, 1) ** 2).sum())

    go = torch.tensor(math.inf)
    want = _grads(lambda a, b: reference(a, b), [z], target, go)[0]
    assert want[0].isnan().all() and not want[1].isnan().all()  # the reference's claim
    got = _grads(_compiled(lambda a, b: xt.cross_entropy(a, b, reduction="sum",
                                                         z_loss=zl)), [z], target, go)[0]
    _same(got, want, "dlogits vs torch's formula")


# ---- the fake implementations' dtypes (mutants: loss and statistics of the input's dtype)


@pytest.mark.parametrize("loss_dtype", [None, torch.float64])
def test_compiled_graph_sees_the_eager_loss_and_statistics_dtypes(loss_dtype):
    """Code traced after the loss sees the dtypes the fake implementation gives: they must
    be the ones eager crossent returns (bfloat16 logits: a float32 loss and lse), else a
    tensor made from them in the graph has another dtype than eagerly."""
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(3)).bfloat16()
    target = torch.tensor([1, 0, IGNORE, 5])

    def made_from(z, t):
        loss, stats = xt.cross_entropy(z, t, loss_dtype=loss_dtype, statistics=("lse",))
        # dtype= read while tracing: a constant of the compiled graph
        return torch.zeros(1, dtype=loss.dtype), torch.zeros(1, dtype=stats.lse.dtype)

    want = made_from(z, target)
    got = _compiled(made_from)(z, target)
    assert [g.dtype for g in got] == [w.dtype for w in want]
    assert want[1].dtype == torch.float32  # eager's lse: the compute dtype


# ---- num_items as a Python int of exactly 2**64 (mutant: threshold off by one)


def test_compiled_num_items_two_to_the_64_is_torchs_sum_over_it():
    """``2**64`` does not fit the operator's Scalar: it must travel as the float eager
    divides by (the loss is torch's sum / 2**64), not fail while tracing."""
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([1, 0, IGNORE, 5])
    want = F.cross_entropy(z.double(), target, reduction="sum") / 2.0 ** 64
    got = _compiled(lambda a, b: xt.cross_entropy(a, b, num_items=2 ** 64))(z, target)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


# ---- torch.export: a run needs a gradient the trace did not ask for
# (mutant: _run_time_requires ignoring ctx.needs_input_grad)


class _Loss(torch.nn.Module):
    def forward(self, z, t):
        return xt.cross_entropy(z, t, reduction="sum")


def test_exported_without_grad_then_run_with_grad_gives_torchs_gradient():
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([1, 0, IGNORE, 5])
    run = torch.export.export(_Loss(), (z, target)).module()  # z does not require grad
    leaf = z.clone().requires_grad_()
    run(leaf, target).backward(torch.tensor(2.0))
    ref = z.double().requires_grad_()
    F.cross_entropy(ref, target, reduction="sum").backward(torch.tensor(2.0, dtype=torch.float64))
    assert leaf.grad is not None
    torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=1e-5, atol=1e-6)


# ---- a class weight's gradient with probability targets (mutant: the logits' gradient
# stored in forward though the weight needs one too)


def test_compiled_probability_target_weight_gradient_is_torchs():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(4, 5, generator=g)
    target = torch.softmax(torch.randn(4, 5, generator=g), 1)
    weight = torch.rand(5, generator=g) + 0.5

    def grads(fn, dtype):
        a, w = z.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        fn(a, target.to(dtype), w).backward(torch.tensor(1.5, dtype=dtype))
        return a.grad, w.grad

    want = grads(lambda a, t, w: F.cross_entropy(a, t, w), torch.float64)
    got = grads(_compiled(lambda a, t, w: xt.cross_entropy(a, t, w)), torch.float32)
    for name, a, b in zip(("dlogits", "dweight"), got, want, strict=True):
        assert a is not None, name
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6, msg=name)
