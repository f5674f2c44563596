"""``backend="triton"`` on the cases that the users of Liger Kernel, Cut Cross-Entropy (CCE)
and Hugging Face transformers' loss utilities rely on or reported as bugs, against torch in
float64 (``F.cross_entropy``, the explicit ``z_loss``/``softcap`` formulas, the unfused
``F.linear`` + ``F.cross_entropy`` head): values and every gradient.

A subset of ``tests/torch/test_contender_semantics.py`` (which lists the sources and runs
every case on the CPU backends), sized for triton's CPU interpreter (see conftest.py):
10-12 rows, 150 classes in tiles of 64 (64, 64 and a ragged 22), options combined rather
than multiplied out, linear chunks of 5 rows.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from grad_probes import ones_or, ref_ce, ref_linear  # noqa: E402

import crossent.torch as xt  # noqa: E402
from crossent.errors import UnsupportedError  # noqa: E402
from crossent.torch._triton import ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter
V, BLOCK, CHUNK = 150, 64, 5
RTOL = 2e-5


@pytest.fixture(autouse=True)
def _ragged_tiles():
    with ops.override_ce_launch(block=BLOCK):
        yield


def close(got, want, rtol=RTOL):
    """Relative to the reference's largest finite magnitude (gradients hold tiny entries)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    finite = torch.isfinite(want)
    scale = float(want[finite].abs().max()) if finite.any() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale + 1e-30,
                               equal_nan=True)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def targets(n, v, g, ignore_index=None, k=3):
    y = torch.randint(0, v, (n,), generator=g)
    if ignore_index is not None:
        y[torch.randperm(n, generator=g)[:k]] = ignore_index
    return y


def row_mask(n, g):
    """A per-row grad_output for "none": random weights and zeros (Liger #968's mask)."""
    w = torch.rand(n, generator=g, dtype=torch.float64)
    w[torch.rand(n, generator=g) < 0.25] = 0.0
    return w


def run_linear(x, w, b, y, grad_output=None, needs=(True, True, True), **kw):
    leaves = [None if t is None else t.detach().clone().to(DEVICE).requires_grad_(need)
              for t, need in zip((x, w, b), needs, strict=True)]
    loss = xt.linear_cross_entropy(leaves[0], leaves[1], y.to(DEVICE), leaves[2],
                                   backend="triton", chunk_size=CHUNK, **kw)
    loss.backward(ones_or(grad_output, loss).to(DEVICE))
    return loss.detach(), *[None if t is None else t.grad for t in leaves]


def check_linear(x, w, b, y, grad_output=None, needs=(True, True, True), **kw):
    got = run_linear(x, w, b, y, grad_output, needs, **kw)
    want = ref_linear(x, w, b, y, grad_output, **kw)
    for name, need, a, e in zip(("loss", "input", "linear_weight", "linear_bias"),
                                (True, *needs), got, want, strict=True):
        assert (a is None) == (e is None or not need), name
        if a is not None:
            assert a.shape == e.shape, name
            close(a, e)


def run_ce(z, y, weight=None, grad_output=None, **kw):
    leaf = z.detach().clone().to(DEVICE).requires_grad_()
    loss = xt.cross_entropy(leaf, y.to(DEVICE), None if weight is None else weight.to(DEVICE),
                            backend="triton", **kw)
    loss.backward(ones_or(grad_output, loss).to(DEVICE))
    return loss.detach(), leaf.grad


# ------------------------------------------------------------------ Liger: cross_entropy
CE_CASES = {
    # Liger test_correctness_with_ignore_index: a positive ignore_index
    "ignore-2-mean": ({"ignore_index": 2}, 1.0, False, None),
    # Liger #678/#968: "none" with ignored rows and a per-row weight mask; smoothing
    # with ignored rows (pytorch#73205: the uniform part skips them)
    "ignore-neg-none-smoothing": ({"ignore_index": -123, "reduction": "none",
                                   "label_smoothing": 0.2}, 1.0, False, "mask"),
    # test_correctness_with_weight_with_other_params, loss * 3 (not the last layer), logits
    # far past the cap (unsloth-zoo#593), z-loss on counted rows only (OLMo#760)
    "weight-all-sum-x3": ({"ignore_index": 42, "reduction": "sum", "label_smoothing": 0.1,
                           "z_loss": 1e-4, "softcap": 30.0}, 60.0, True, 3.0),
    # an ignore_index past the last class (torch ignores it too); Chameleon's z 1e-5
    "weight-all-mean": ({"ignore_index": V + 7, "label_smoothing": 0.2, "z_loss": 1e-5,
                         "softcap": 40.0}, 20.0, True, None),
}


@pytest.mark.parametrize("case", list(CE_CASES))
def test_liger_cross_entropy_cases(case):
    options, scale, weighted, go = CE_CASES[case]
    g = gen(1)
    z = torch.randn(10, V, generator=g) * scale
    y = targets(10, V, g, options.get("ignore_index"))
    cw = torch.rand(V, generator=g) if weighted else None
    go = row_mask(10, g) if go == "mask" else None if go is None else torch.tensor(go)
    loss, grad = run_ce(z, y, cw, go, **options)
    want = ref_ce(z, y, cw, go, **options)
    close(loss, want[0])
    close(grad, want[1])
    ignored = y.to(DEVICE) == options.get("ignore_index", -100)
    assert not grad[ignored].any()  # exactly 0 on ignored rows, as torch


def test_every_target_ignored():
    # pytorch#116349 / #70348: "mean" over no counted target is NaN (zero gradients), "sum"
    # 0, "none" zeros; transformers' ForCausalLMLoss inherits the NaN
    z, y = torch.randn(4, V, generator=gen(2)), torch.full((4,), -100)
    for reduction in ("mean", "sum", "none"):
        loss, grad = run_ce(z, y, reduction=reduction, label_smoothing=0.1, z_loss=1e-4)
        assert bool(loss.isnan().all()) == (reduction == "mean")
        if reduction != "mean":
            assert not loss.any()
        assert not grad.any()


def test_out_of_range_target_raises_index_error():
    # Liger raises an AssertionError "out of bounds"; torch an IndexError, and so crossent
    g = gen(3)
    z, y = torch.randn(6, V, generator=g).bfloat16(), targets(6, V, g, -123, k=2)
    y[1] = V + 3
    with pytest.raises(IndexError):
        xt.cross_entropy(z.to(DEVICE).requires_grad_(), y.to(DEVICE), ignore_index=-123,
                         backend="triton")


def test_bfloat16_logits_are_computed_in_float32():
    # Liger test_float32_internal: the float32 loss of bf16 logits is the float64 one to
    # float32 precision and each gradient entry is the float64 one rounded to bf16 once.
    # triton's CPU interpreter (3.9) casts float32 to bfloat16 by truncation, not to
    # nearest as the GPU does: there each entry is within one bf16 ulp instead of half
    g = gen(4)
    z, y = (torch.randn(6, V, generator=g) * 3).bfloat16(), targets(6, V, g, 5, k=1)
    loss, grad = run_ce(z, y, loss_dtype=torch.float32, ignore_index=5, label_smoothing=0.1)
    want, want_grad = ref_ce(z, y, ignore_index=5, label_smoothing=0.1)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    close(loss, want)
    err = (grad.double().cpu() - want_grad).abs()
    ulps = 1.0 if DEVICE == "cuda" else 2.0
    assert (err <= want_grad.abs() * ulps * 2.0 ** -8 + 1e-6 * want_grad.abs().max()).all()


def test_padded_vocabulary_of_minus_infinity_logits():
    # a vocabulary padded with -inf logits: with label smoothing torch's loss is +inf (the
    # uniform part meets log 0) and its gradient finite; the padding spans a whole tile
    g = gen(12)
    z = torch.randn(6, 2 * BLOCK + 22, generator=g) * 3
    z[:, -(BLOCK + 10):] = -torch.inf
    y = targets(6, BLOCK, g, -100, k=1)
    loss, grad = run_ce(z, y, label_smoothing=0.1, z_loss=1e-3)
    want = ref_ce(z, y, label_smoothing=0.1, z_loss=1e-3)
    assert loss.isinf() and want[0].isinf()
    assert torch.isfinite(grad).all()
    close(grad, want[1])


@pytest.mark.parametrize("bad", [torch.inf, torch.nan])
def test_non_finite_weight_of_an_unused_class(bad):
    """torch's NLL reads w[y] only: an inf/NaN weight of a class no row targets changes
    neither the loss nor the gradient (the kernel once formed eps / V * sum(w) with eps 0:
    0 x inf, every gradient NaN); with smoothing every row's loss is torch's inf / NaN."""
    g = gen(21)
    z = torch.randn(8, V, generator=g, dtype=torch.float64)
    y = targets(8, V - 1, g, -100, k=2)
    cw = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    cw[V - 1] = bad  # class V - 1 is nobody's target
    loss, grad = run_ce(z, y, cw)
    want = ref_ce(z, y, cw)
    close(loss, want[0])
    close(grad, want[1])
    smoothed, _ = run_ce(z, y, cw, label_smoothing=0.1, reduction="none")
    close(smoothed, ref_ce(z, y, cw, label_smoothing=0.1, reduction="none")[0])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0 / 0
def test_zero_total_class_weight_with_label_smoothing_is_nan():
    # weight 0 for the pad class and a batch of pad targets: torch's smoothed "mean" is
    # NaN (its NLL part is 0 / 0), and so is the Triton kernel's (crossent.torch._rules.
    # reduce_rows, the one "mean" rule of every kernel)
    g = gen(5)
    z, y = torch.randn(6, V, generator=g), torch.tensor([3, 3, 7, -100, 7, 3])
    cw = torch.rand(V, generator=g)
    cw[3] = cw[7] = 0.0
    loss, grad = run_ce(z, y, cw, label_smoothing=0.1)
    assert loss.isnan()
    assert grad[y != -100].isnan().all() and not grad[y == -100].any()


def test_statistics_are_refused_by_name():
    # Liger's return_z_loss / return_token_accuracy are crossent's statistics=, which the
    # Triton kernels do not compute: refused by name, never a different computation
    z, y = torch.randn(4, V), torch.randint(0, V, (4,))
    with pytest.raises(UnsupportedError, match="statistics"):
        xt.cross_entropy(z.to(DEVICE), y.to(DEVICE), backend="triton", statistics="z_loss")


# ------------------------------------------------------- Liger / CCE: the linear head
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_liger_fused_linear_all_options(reduction):
    # Liger test_fused_linear_cross_entropy.test_correctness with every option (class
    # weights, smoothing 0.1, ignore_index 42, z 1e-4, softcap 30, bias; a head of [0, 1)
    # entries, so large logits); "none" with a per-row mask as grad_output (Liger #968)
    g = gen(6)
    x, w, b = (torch.randn(8, 16, generator=g), torch.rand(V, 16, generator=g),
               torch.rand(V, generator=g))
    y, cw = targets(8, V, g, 42, k=2), torch.rand(V, generator=g)
    go = row_mask(8, g) if reduction == "none" else None
    check_linear(x, w, b, y, go, reduction=reduction, weight=cw, label_smoothing=0.1,
                 ignore_index=42, z_loss=1e-4, softcap=30.0)


def cce_data(seed):
    # CCE's recipe: e ~ N(0, 1/D), c ~ N(0, 1) with its first rows copied from e, bias
    # ~ N(0, 0.02^2), a fifth of the targets ignored; e viewed as (B, T, D)
    g = gen(seed)
    e = torch.randn(12, 23, generator=g) / 23 ** 0.5
    c = torch.randn(V, 23, generator=g)
    c[:6] = e[:6]
    b = torch.randn(V, generator=g) * 0.02
    y = targets(12, V, g, -100, k=2)
    return e.view(2, 6, 23), c, b, y.view(2, 6)


def test_cce_shift_reduction_none_softcap():
    # CCE test_loss_forward/backward: shift (crossent's shift=True), softcap 20, bias,
    # "none" of shape (B, T - 1), here with a per-position weight mask
    e, c, b, y = cce_data(7)
    go = row_mask(10, gen(8)).reshape(2, 5)
    check_linear(e, c, b, y, go, shift=True, reduction="none", softcap=20.0)


def test_cce_partial_gradients():
    # CCE test_loss_partials: only the classifier needs a gradient
    e, c, b, y = cce_data(9)
    check_linear(e.reshape(-1, 23), c, b, y.reshape(-1), needs=(False, True, False))


def test_hf_gradient_accumulation_with_num_items():
    # transformers' num_items_in_batch (crossent's num_items): micro-batches divided by the
    # whole batch's count add up to the full batch's mean, values and gradients
    g = gen(10)
    x, w = torch.randn(8, 16, generator=g), torch.randn(V, 16, generator=g)
    y = targets(8, V, g, -100, k=2)
    want = ref_linear(x, w, None, y)
    count = int((y != -100).sum())
    xl, wl = x.clone().to(DEVICE).requires_grad_(), w.clone().to(DEVICE).requires_grad_()
    total = 0.0
    for rows in (slice(0, 3), slice(3, 8)):
        loss = xt.linear_cross_entropy(xl[rows], wl, y[rows].to(DEVICE), backend="triton",
                                       chunk_size=CHUNK, num_items=count)
        loss.backward()
        total = total + loss.detach()
    close(total, want[0])
    close(xl.grad, want[1])
    close(wl.grad, want[2])


def test_cce_bfloat16_classifier_gradient():
    # CCE issue #14 / axolotl#1601: a bf16 head over many rows and chunks (48 rows, 6
    # chunks; 70 classes: tiles of 64 and 6); dx and dW stay within torch's own bf16 error
    # against float64 (dW summed in float32 across chunks)
    g = gen(11)
    x = torch.randn(48, 16, generator=g).bfloat16()
    w = (torch.randn(70, 16, generator=g) * 0.3).bfloat16()
    y = torch.randint(0, 70, (48,), generator=g)
    want = ref_linear(x, w, None, y)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.cross_entropy(F.linear(xs, ws).float(), y).backward()
    leaves = (x.clone().to(DEVICE).requires_grad_(), w.clone().to(DEVICE).requires_grad_())
    xt.linear_cross_entropy(*leaves, y.to(DEVICE), backend="triton", chunk_size=8).backward()
    for ours, theirs, ref in ((leaves[0].grad, xs.grad, want[1]),
                              (leaves[1].grad, ws.grad, want[2])):
        scale = float(ref.abs().max())
        ours_err = float((ours.double().cpu() - ref).abs().max())
        torch_err = float((theirs.double() - ref).abs().max())
        assert ours_err <= 1.5 * torch_err + 2.0 ** -9 * scale, (ours_err, torch_err)
