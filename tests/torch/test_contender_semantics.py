"""crossent.torch on the cases that the users of Liger Kernel, Cut Cross-Entropy (CCE) and
Hugging Face transformers' loss utilities rely on (their own test suites) or reported as
bugs (their issue trackers), mapped onto crossent's public API and checked against an
independent reference: torch in float64 (``F.cross_entropy``; the explicit formulas for
``z_loss`` and ``softcap``; the unfused ``F.linear`` + ``F.cross_entropy`` for the head),
values and the gradients of logits, hidden states, linear weight and bias.

Each case runs on ``backend="auto"`` as users get it (small inputs dispatched to torch's
own kernel where it serves them) and on the CPU row-block kernel with ragged blocks
(16-row blocks, 7-row linear chunks, at row counts that are not multiples of either); the
cases with torch's own options (index targets, no class weights or smoothing) also on
``"auto"``'s small-batch fused kernel.
``tests/triton/test_triton_contender_semantics.py`` runs a subset on the Triton kernels.

Where a contender's semantics differ from torch's, crossent follows torch and the case
says so in a comment. No code is taken from those projects, only the cases (facts):

* Liger Kernel ``test/transformers/test_cross_entropy.py`` and
  ``test_fused_linear_cross_entropy.py``; issues linkedin/Liger-Kernel#678, #968
  (``reduction="none"`` gradients with ignored rows), PR #420 (class weights with label
  smoothing), PR #239 (z-loss ``lse_square_scale`` on counted rows only);
* CCE (apple/ml-cross-entropy) ``tests/test_cce_loss_forward.py`` /
  ``test_cce_loss_backward.py``; issue #14 (bf16 classifier gradient), #48 (softcap);
* transformers ``loss/loss_utils.py`` (``ForCausalLMLoss``: ``num_items_in_batch``,
  ``shift_labels``, ``ignore_index=-100``, the float32 upcast); pytorch/pytorch#73205
  (label smoothing with ignored rows), #116349 / #70348 (every target ignored: NaN mean),
  allenai/OLMo#760 (z-loss mean over counted rows), unslothai/unsloth-zoo#593 (softcap is
  ``c tanh(z / c)``, visible only where ``|z|`` exceeds ``c``).
"""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from grad_probes import ones_or, ref_ce, ref_linear, ref_loss  # noqa: E402

import crossent.torch as xt  # noqa: E402
from crossent.errors import InputError  # noqa: E402
from crossent.integrations.transformers import causal_lm_loss  # noqa: E402
from crossent.torch import _backends, _rules  # noqa: E402

RTOL = 2e-5  # float32 against float64, relative to the reference's largest magnitude
LINEAR_CHUNK = {"auto": None, "rowblock": 7}  # ragged chunks on the row-block head


AUTO = pytest.param("auto", marks=pytest.mark.native_dispatch)
# "auto" where its small-batch fused kernel serves a call (from 240 000 float32 logits on,
# index targets, neither class weights nor smoothing; lowered here to every size)
SMALL = pytest.param("small", marks=pytest.mark.native_dispatch)


def _backend(name, monkeypatch):
    if name == "rowblock":
        monkeypatch.setattr(_rules, "_BLOCK_BYTES", 0)
    if name == "small":
        monkeypatch.setattr(_backends, "SMALL_MIN_LOGITS", 1)
        return "auto"
    return name


@pytest.fixture(params=[AUTO, "rowblock"])
def backend(request, monkeypatch):
    """``"auto"`` with torch's small-input dispatch kept (what users get), or the row-block
    kernel with blocks of 16 rows (``block_rows``' floor), ragged at the row counts below."""
    return _backend(request.param, monkeypatch)


@pytest.fixture(params=[AUTO, "rowblock", SMALL])
def any_backend(request, monkeypatch):
    """:func:`backend` and ``"auto"`` on its small-batch fused kernel, for the calls it
    serves (torch's options without class weights or label smoothing)."""
    return _backend(request.param, monkeypatch)


def close(got, want, rtol=RTOL):
    """Relative to the reference's largest finite magnitude (gradients hold tiny entries)."""
    got, want = got.detach().double(), want.detach().double()
    finite = torch.isfinite(want)
    scale = float(want[finite].abs().max()) if finite.any() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale + 1e-30,
                               equal_nan=True)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logits(n, v, g, scale=1.0, dtype=torch.float32):
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)


def targets(n, v, g, ignore_index=None):
    """Class indices; with ``ignore_index``, between 1 and n/2 random rows set to it (the
    contenders' recipe)."""
    y = torch.randint(0, v, (n,), generator=g)
    if ignore_index is not None:
        k = int(torch.randint(1, n // 2, (1,), generator=g))
        y[torch.randperm(n, generator=g)[:k]] = ignore_index
    return y


def row_grad_output(n, g):
    """A per-row ``grad_output`` for ``reduction="none"``: random weights and a zero mask
    (Liger #968 multiplies the per-token losses by a weight mask)."""
    w = torch.rand(n, generator=g, dtype=torch.float64)
    w[torch.rand(n, generator=g) < 0.25] = 0.0
    return w


def run_ce(backend, z, y, weight=None, grad_output=None, **kw):
    leaf = z.detach().clone().requires_grad_()
    loss = xt.cross_entropy(leaf, y, weight, backend=backend, **kw)
    loss.backward(ones_or(grad_output, loss))
    return loss.detach(), leaf.grad


def check_ce(backend, z, y, weight=None, grad_output=None, rtol=RTOL, **kw):
    got = run_ce(backend, z, y, weight, grad_output, **kw)
    want = ref_ce(z, y, weight, grad_output, **kw)
    close(got[0], want[0], rtol)
    close(got[1], want[1], rtol)
    return got, want


def run_linear(backend, x, w, b, y, grad_output=None, needs=(True, True, True), **kw):
    leaves = [None if t is None else t.detach().clone().requires_grad_(need)
              for t, need in zip((x, w, b), needs, strict=True)]
    loss = xt.linear_cross_entropy(leaves[0], leaves[1], y, leaves[2], backend=backend,
                                   chunk_size=LINEAR_CHUNK[backend], **kw)
    loss.backward(ones_or(grad_output, loss))
    return loss.detach(), *[None if t is None else t.grad for t in leaves]


def check_linear(backend, x, w, b, y, grad_output=None, rtol=RTOL, **kw):
    got = run_linear(backend, x, w, b, y, grad_output, **kw)
    want = ref_linear(x, w, b, y, grad_output, **kw)
    for name, a, e in zip(("loss", "input", "linear_weight", "linear_bias"), got, want,
                          strict=True):
        assert (a is None) == (e is None), name
        if e is not None:
            assert a.shape == e.shape, name
            close(a, e, rtol)
    return got, want


# ------------------------------------------------------------------ Liger: cross_entropy
N, V = 39, 301  # Liger's "weird shapes": 39 rows are 16 + 16 + 7 in blocks of 16


@pytest.mark.parametrize("ignore_index, reduction", [
    (None, "mean"), (None, "none"), (2, "sum"), (2, "none"), (-123, "mean"), (V + 7, "sum"),
])
def test_liger_reductions_with_ignore_index(any_backend, reduction, ignore_index):
    # Liger test_correctness / test_correctness_with_ignore_index: a positive and a
    # negative ignore_index, random rows ignored (and one past the last class, which torch
    # ignores too); "none" with a per-row weight mask as grad_output (Liger #678, #968:
    # zero or wrong gradients there)
    g = gen(1)
    z, y = logits(N, V, g), targets(N, V, g, ignore_index)
    go = row_grad_output(N, g) if reduction == "none" else None
    kw = {} if ignore_index is None else {"ignore_index": ignore_index}
    (loss, grad), _ = check_ce(any_backend, z, y, grad_output=go, reduction=reduction, **kw)
    if ignore_index is not None:  # torch: exactly 0 on ignored rows, loss and gradient
        ignored = y == ignore_index
        assert (grad[ignored] == 0).all()
        if reduction == "none":
            assert (loss[ignored] == 0).all()


@pytest.mark.parametrize("ignore_index, eps, reduction",
                         [(None, 0.1, "mean"), (1, 0.1, "mean"), (1, 0.1, "sum"),
                          (1, 0.1, "none"), (-300, 0.2, "mean")])
def test_liger_label_smoothing_with_ignore_index(backend, reduction, ignore_index, eps):
    # Liger test_correctness_with_label_smoothing(_with_ignore_index); pytorch#73205: the
    # uniform part of the smoothed target must skip ignored rows as the one-hot part does
    g = gen(2)
    z, y = logits(N, V, g), targets(N, V, g, ignore_index)
    go = row_grad_output(N, g) if reduction == "none" else None
    kw = {} if ignore_index is None else {"ignore_index": ignore_index}
    (loss, _), _ = check_ce(backend, z, y, grad_output=go, reduction=reduction,
                            label_smoothing=eps, **kw)
    if ignore_index is not None and reduction != "none":
        kept = y != ignore_index  # the same loss from the counted rows alone
        alone = F.cross_entropy(z[kept].double(), y[kept], reduction=reduction,
                                label_smoothing=eps)
        close(loss, alone)


@pytest.mark.parametrize("softcap, scale, reduction",
                         [(30.0, 1.0, "mean"), (30.0, 60.0, "none"), (40.0, 100.0, "sum")])
def test_liger_softcap(backend, reduction, softcap, scale):
    # Liger test_correctness_with_softcap (30.0, logits ~ N(0, 1), where the cap barely
    # acts) and logits far beyond the cap, where c * tanh(z / c) and the gradient's
    # 1 - tanh^2 factor decide the numbers (unsloth-zoo#593 multiplied by z instead of c)
    g = gen(3)
    z, y = logits(N, V, g, scale), targets(N, V, g, -100)
    go = row_grad_output(N, g) if reduction == "none" else None
    check_ce(backend, z, y, grad_output=go, reduction=reduction, softcap=softcap)


@pytest.mark.parametrize("z_loss, eps, ignore_index, reduction",  # PaLM's, Chameleon's
                         [(1e-4, 0.0, None, "mean"), (1e-5, 0.1, 42, "mean"),
                          (1e-4, 0.2, -42, "sum"), (0.05, 0.1, 42, "none")])
def test_liger_z_loss(backend, z_loss, eps, ignore_index, reduction):
    # Liger test_correctness_with_z_loss(_with_other_params): lse_square_scale is crossent's
    # z_loss, added on counted rows only and averaged over them (OLMo#760). Liger's
    # return_z_loss=True is statistics="z_loss": the per-token term, NaN on ignored rows
    g = gen(4)
    z, y = logits(N, V, g, 4.0), targets(N, V, g, ignore_index)
    kw = {} if ignore_index is None else {"ignore_index": ignore_index}
    go = row_grad_output(N, g) if reduction == "none" else None
    check_ce(backend, z, y, grad_output=go, reduction=reduction, label_smoothing=eps,
             z_loss=z_loss, **kw)
    loss, stats = xt.cross_entropy(z, y, reduction=reduction, label_smoothing=eps,
                                   z_loss=z_loss, backend=backend, statistics="z_loss", **kw)
    counted = y != (-100 if ignore_index is None else ignore_index)
    term = z_loss * torch.logsumexp(z.double(), 1) ** 2
    close(stats.z_loss, torch.where(counted, term, torch.nan))
    assert torch.equal(stats.counted, counted)
    z_mean = term[counted].sum() / counted.sum()
    if reduction == "mean":  # the loss minus the plain cross-entropy is the z term's mean
        plain = F.cross_entropy(z.double(), y, label_smoothing=eps, **kw)
        close(loss - plain, z_mean, rtol=1e-3)


ALL_A = {"ignore_index": -100, "z_loss": 1e-4, "label_smoothing": 0.1, "softcap": 30.0}
ALL_B = {"ignore_index": 42, "z_loss": 1e-5, "label_smoothing": 0.2, "softcap": 40.0}


@pytest.mark.parametrize("options, reduction", [
    ({}, "mean"), ({}, "none"), (ALL_A, "mean"), (ALL_A, "sum"), (ALL_B, "none"),
], ids=["mean", "none", "all-a-mean", "all-a-sum", "all-b-none"])
def test_liger_class_weights(backend, reduction, options):
    # Liger test_correctness_with_weight(_with_other_params); Liger PR #420 / pytorch#104776:
    # with label smoothing, torch weights the uniform part per class (w_c) and divides
    # "mean" by sum_n w[y_n]; crossent follows torch. (Liger's test passes float32 weights
    # with bfloat16 logits; torch raises there, and so does crossent: see below.)
    g = gen(5)
    z, y = logits(N, V, g, 20.0), targets(N, V, g, options.get("ignore_index"))
    w = torch.rand(V, generator=g)
    go = row_grad_output(N, g) if reduction == "none" else None
    check_ce(backend, z, y, w, grad_output=go, reduction=reduction, **options)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_liger_not_last_layer_and_random_grad_output(any_backend, reduction):
    # Liger test_correctness_not_last_layer (loss * 3) and test_correctness_functional
    # (ignore_index=0, z 1e-4, smoothing 0.1, softcap 30, a random grad_output)
    g = gen(6)
    z, y = logits(N, V, g, 10.0), targets(N, V, g, 0)
    leaf = z.clone().requires_grad_()
    (xt.cross_entropy(leaf, y, reduction=reduction, backend=any_backend) * 3).backward()
    ref = z.double().requires_grad_()
    (F.cross_entropy(ref, y, reduction=reduction) * 3).backward()
    close(leaf.grad, ref.grad)
    go = torch.randn((), generator=g, dtype=torch.float64)
    check_ce(any_backend, z, y, grad_output=go, reduction=reduction, ignore_index=0,
             z_loss=1e-4, label_smoothing=0.1, softcap=30.0)


def test_liger_out_of_range_target_raises_index_error(backend):
    # Liger test_correctness_with_out_of_bounds_target: targets in [V, 2V) among ignored
    # rows; Liger raises an AssertionError "out of bounds", torch an IndexError: crossent
    # follows torch
    g = gen(7)
    z, y = logits(N, V, g, dtype=torch.bfloat16), targets(N, V, g, -123)
    y[torch.randperm(N, generator=g)[:5]] = torch.randint(V, 2 * V, (5,), generator=g)
    with pytest.raises(IndexError):
        xt.cross_entropy(z.requires_grad_(), y, ignore_index=-123, backend=backend)


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "ignore_index": 5}],
                         ids=["plain", "smoothing+ignored"])
def test_liger_bfloat16_logits_are_computed_in_float32(backend, options):
    # Liger test_float32_internal (bf16 and float32 logits of the same values give the same
    # loss) and its bf16 tolerance (rtol 5e-2): crossent computes in float32 and rounds
    # once, so the float32 loss of bf16 logits is the float64 one to float32 precision and
    # every gradient entry is the float64 one rounded to bfloat16
    g = gen(8)
    z = logits(8, 4099, g, 3.0, torch.bfloat16)
    y = targets(8, 4099, g, options.get("ignore_index"))
    want, want_grad = ref_ce(z, y, **options)
    leaf = z.clone().requires_grad_()
    loss32 = xt.cross_entropy(leaf, y, loss_dtype=torch.float32, backend=backend, **options)
    assert loss32.dtype == torch.float32
    close(loss32, want)
    loss32.backward()
    assert leaf.grad.dtype == torch.bfloat16
    # one rounding to bf16 (plus float32's error where p_c - eps / C cancels)
    err = (leaf.grad.double() - want_grad).abs()
    assert (err <= want_grad.abs() * 2.0 ** -8 + 1e-6 * want_grad.abs().max()).all()
    loss16 = xt.cross_entropy(z, y, backend=backend, **options)
    assert loss16.dtype == torch.bfloat16
    assert abs(loss16.double() - want) <= abs(want) * 2.0 ** -8
    with pytest.raises(InputError, match="weight"):  # float32 weights, bf16 logits: torch raises
        xt.cross_entropy(z, y, torch.rand(4099), backend=backend, **options)


# ------------------------------------------------------- Liger: fused linear cross-entropy
FLCE_OPTIONS = [
    {},
    {"weight": True, "label_smoothing": 0.1, "ignore_index": 42, "z_loss": 1e-4,
     "softcap": 30.0},
]


def flce_data(seed, n, h, v, bias):
    # Liger's recipe: hidden states ~ N(0, 1), a head of uniform [0, 1) entries (so the
    # logits are large and far from uniform), uniform bias
    g = gen(seed)
    x = torch.randn(n, h, generator=g)
    w = torch.rand(v, h, generator=g)
    b = torch.rand(v, generator=g) if bias else None
    return g, x, w, b


@pytest.mark.parametrize("options", FLCE_OPTIONS, ids=["default", "all-options"])
@pytest.mark.parametrize("bias, reduction", [(True, "mean"), (False, "sum"), (True, "none")])
def test_liger_fused_linear_cross_entropy(backend, reduction, bias, options):
    # Liger test_fused_linear_cross_entropy.test_correctness at its random shape
    # (B, T, H, V) = (4, 47, 31, 123), here (4, 11, 31, 123): loss, dx, dW, db
    g, x, w, b = flce_data(9, 4 * 11, 31, 123, bias)
    kw = dict(options)
    y = targets(44, 123, g, kw.get("ignore_index", -100))
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(123, generator=g)
    go = row_grad_output(44, g) if reduction == "none" else None
    check_linear(backend, x, w, b, y, go, reduction=reduction, **kw)


@pytest.mark.parametrize("shape, bias", [((2, 2, 8, 8), True), ((9, 7, 41, 41), False)])
def test_liger_fused_linear_functional_signed_class_weights(backend, shape, bias):
    # Liger test_correctness_functional: class weights drawn from N(0, 1) (negative ones
    # included: torch accepts them), ignore_index -100, z 1e-4, smoothing 0.1, softcap 30,
    # a random grad_output
    bt, t, h, v = shape
    g = gen(10)
    x, w = torch.randn(bt * t, h, generator=g), torch.randn(v, h, generator=g)
    b = torch.randn(v, generator=g) if bias else None
    y = torch.randint(0, v, (bt * t,), generator=g)
    cw = torch.randn(v, generator=g)
    assert abs(float(cw[y].sum())) > 0.5  # "mean" divides by it: keep it away from 0
    go = torch.randn((), generator=g, dtype=torch.float64)
    check_linear(backend, x, w, b, y, go, rtol=1e-4, weight=cw, ignore_index=-100,
                 z_loss=1e-4, label_smoothing=0.1, softcap=30.0)


@pytest.mark.parametrize("dtype, bias", [(torch.bfloat16, True), (torch.float16, False)])
def test_liger_fused_linear_under_autocast(backend, dtype, bias):
    # Liger test_amp: float32 parameters under autocast(bf16/fp16). torch's autocast runs
    # the head's matmul in the low dtype and the loss in float32, and so does crossent:
    # its error against float64 (from the rounded inputs) is within torch's own
    g, x, w, b = flce_data(11, 4 * 11, 31, 123, bias)
    y = targets(44, 123, g, -100)
    rounded = [None if t is None else t.to(dtype) for t in (x, w, b)]
    want = ref_linear(*rounded, y)

    def under_autocast(fn):
        leaves = [None if t is None else t.clone().requires_grad_() for t in (x, w, b)]
        with torch.autocast("cpu", dtype=dtype):
            loss = fn(leaves)
        loss.backward()
        return loss.detach(), *[None if t is None else t.grad for t in leaves]

    theirs = under_autocast(lambda p: F.cross_entropy(F.linear(p[0], p[1], p[2]), y))
    ours = under_autocast(lambda p: xt.linear_cross_entropy(
        p[0], p[1], y, p[2], backend=backend, chunk_size=LINEAR_CHUNK[backend]))
    assert ours[0].dtype == theirs[0].dtype == torch.float32
    for name, a, t, e in zip(("loss", "input", "linear_weight", "linear_bias"),
                             ours, theirs, want, strict=True):
        if e is None:
            continue
        scale = float(e.abs().max())
        ours_err = float((a.double() - e).abs().max())
        torch_err = float((t.double() - e).abs().max())
        assert ours_err <= 2 * torch_err + 1e-6 * scale, (name, ours_err, torch_err)


# ------------------------------------------------------------------ CCE
def cce_data(seed, n, v, d, bias, invalid, dtype=torch.float32):
    # CCE's recipe: e ~ N(0, 1/D), c ~ N(0, 1) with its first rows copied from e (some
    # peaked rows), bias ~ N(0, 0.02^2), 20% of the targets ignored; e viewed as (4, T, D)
    g = gen(seed)
    e = torch.randn(n, d, generator=g) / d ** 0.5
    c = torch.randn(v, d, generator=g)
    c[: min(n, v) // 2] = e[: min(n, v) // 2]
    b = torch.randn(v, generator=g) * 0.02 if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    if invalid:
        y[torch.randperm(n, generator=g)[: int(0.2 * n)]] = -100
    e, c = e.to(dtype), c.to(dtype)
    return e.view(4, -1, d), c, None if b is None else b.to(dtype), y.view(4, -1)


@pytest.mark.parametrize("shift, reduction, invalid, softcap, bias", [
    (False, "none", False, None, False), (False, "mean", True, 20.0, True),
    (False, "sum", True, None, False), (True, "none", True, 20.0, True),
    (True, "mean", False, None, False), (True, "sum", True, 20.0, True),
])
def test_cce_linear_cross_entropy(backend, reduction, invalid, shift, softcap, bias):
    # CCE test_loss_forward / test_loss_backward at a ragged shape (their (252, 507, 123)
    # becomes (52, 131, 23)): "sum" divided by the count of counted targets (their recipe),
    # "none" with a per-position weight mask (theirs averages it), shift as crossent's
    # shift=True ((B, T, D) hidden states); without shift the (B, T, D) view is flattened
    # (torch's linear_cross_entropy takes (N, D) only)
    e, c, b, y = cce_data(12, 52, 131, 23, bias, invalid)
    if not shift:
        e, y = e.reshape(-1, 23), y.reshape(-1)
    targets_ = y[:, 1:] if shift else y
    count = int((targets_ != -100).sum())
    go = (row_grad_output(targets_.numel(), gen(0)).reshape(targets_.shape)
          if reduction == "none" else torch.tensor(1.0 / count if reduction == "sum" else 1.0,
                                                   dtype=torch.float64))
    (loss, *_), _ = check_linear(backend, e, c, b, y, go, reduction=reduction,
                                 softcap=softcap, shift=shift)
    if reduction == "none":  # CCE: (B, T - 1) with shift
        assert loss.shape == targets_.shape


@pytest.mark.parametrize("needs", [(True, False, True), (False, True, False)])
def test_cce_partial_gradients(backend, needs):
    # CCE test_loss_partials: only some of hidden states, classifier and bias need a
    # gradient; exactly those get one, and it is torch's
    e, c, b, y = cce_data(13, 52, 131, 23, True, True)
    e, y = e.reshape(-1, 23), y.reshape(-1)
    got = run_linear(backend, e, c, b, y, needs=needs)
    want = ref_linear(e, c, b, y)
    close(got[0], want[0])
    for need, a, w in zip(needs, got[1:], want[1:], strict=True):
        assert (a is not None) == need
        if need:
            close(a, w)


def test_cce_integer_shift_and_three_dimensional_input_raise(backend):
    # CCE's shift is an int (shift=2 drops two positions); crossent's is a bool and says
    # so; (B, T, D) hidden states without shift: torch raises, crossent names input
    e, c, _, y = cce_data(14, 52, 131, 23, False, False)
    with pytest.raises(InputError, match="shift"):
        xt.linear_cross_entropy(e, c, y, shift=2, backend=backend)
    with pytest.raises(InputError, match="input"):
        xt.linear_cross_entropy(e, c, y, backend=backend)


def test_cce_bfloat16_classifier_gradient(backend):
    # CCE issue #14 (bf16 classifier gradients far from torch's) and the half-precision
    # accumulator across chunks (axolotl#1601): with many rows (and, on the row-block
    # head, many chunks) dW's error against float64 stays within torch's own bf16 error
    g = gen(15)
    x = torch.randn(1024, 32, generator=g).bfloat16()
    w = (torch.randn(48, 32, generator=g) * 0.3).bfloat16()
    y = torch.randint(0, 48, (1024,), generator=g)
    want = ref_linear(x, w, None, y)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.cross_entropy(F.linear(xs, ws).float(), y).backward()
    leaves = (x.clone().requires_grad_(), w.clone().requires_grad_())
    chunk = 64 if backend == "rowblock" else None  # 16 chunks
    xt.linear_cross_entropy(*leaves, y, loss_dtype=torch.float32, backend=backend,
                            chunk_size=chunk).backward()
    for ours, theirs, ref in ((leaves[0].grad, xs.grad, want[1]),
                              (leaves[1].grad, ws.grad, want[2])):
        scale = float(ref.abs().max())
        ours_err = float((ours.double() - ref).abs().max())
        torch_err = float((theirs.double() - ref).abs().max())
        assert ours_err <= 1.5 * torch_err + 2.0 ** -9 * scale, (ours_err, torch_err)


# ------------------------------------------------------------------ transformers
B, T, H, VOCAB = 3, 9, 16, 67


def hf_batch(seed, dtype=torch.float32):
    """Hidden states, LM head, and SFT labels: a random prompt prefix and right padding
    masked with -100 (what the Trainer's collators produce)."""
    g = gen(seed)
    h = torch.randn(B, T, H, generator=g).to(dtype)
    w = (torch.randn(VOCAB, H, generator=g) * 0.7).to(dtype)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    prompt = torch.randint(0, T // 2, (B,), generator=g)
    labels[torch.arange(T) < prompt[:, None]] = -100
    labels[0, -2:] = -100
    return h, w, labels


def hf_reference(h, w, labels, num_items=None, softcap=None, ignore_index=-100):
    """transformers' ForCausalLMLoss computed in float64 by hand: labels padded with
    ignore_index and shifted left, "mean", or the sum over num_items_in_batch."""
    shifted = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    hl, wl = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    z = F.linear(hl, wl).reshape(-1, VOCAB)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, shifted.reshape(-1), ignore_index=ignore_index,
                           reduction="mean" if num_items is None else "sum")
    loss = loss if num_items is None else loss / num_items
    loss.backward()
    return loss.detach(), hl.grad, wl.grad


def hf_ours(fn, h, w):
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(hl, wl)
    loss.backward()
    return loss.detach(), hl.grad, wl.grad


@pytest.mark.parametrize("num_items, softcap", [(None, None), (17, 30.0), (torch.tensor(17), None)],
                         ids=["mean", "int-softcap", "tensor"])
def test_hf_for_causal_lm_loss(any_backend, num_items, softcap):
    # transformers ForCausalLMLoss: shift inside, -100 ignored, mean or sum over
    # num_items_in_batch (an int from a custom trainer, or the Trainer's tensor), Gemma's
    # final_logit_softcapping (CCE #48: the cap must be applied); three spellings in
    # crossent: causal_lm_loss, linear_cross_entropy(shift=True, num_items=...) and
    # cross_entropy(logits, shifted labels, num_items=...) on transformers' own logits
    h, w, labels = hf_batch(16)
    h = h * 4.0  # logits beyond the cap where softcap is given
    want = hf_reference(h, w, labels, num_items, softcap)
    chunk = LINEAR_CHUNK[any_backend]
    got = hf_ours(lambda a, b: causal_lm_loss(a, b, labels, num_items_in_batch=num_items,
                                              softcap=softcap, chunk_size=chunk), h, w)
    for a, e in zip(got, want, strict=True):
        close(a, e)
    kw = {} if num_items is None else {"num_items": num_items}
    got = hf_ours(lambda a, b: xt.linear_cross_entropy(
        a, b, labels, shift=True, softcap=softcap, backend=any_backend, chunk_size=chunk, **kw),
        h, w)
    for a, e in zip(got, want, strict=True):
        close(a, e)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    got = hf_ours(lambda a, b: xt.cross_entropy(
        F.linear(a, b).reshape(-1, VOCAB), shifted, softcap=softcap, backend=any_backend, **kw),
        h, w)
    for a, e in zip(got, want, strict=True):
        close(a, e)
    if softcap is None and importlib.util.find_spec("transformers"):  # and theirs, float32
        from transformers.loss.loss_utils import ForCausalLMLoss
        theirs = ForCausalLMLoss(F.linear(h, w), labels, VOCAB, num_items_in_batch=num_items)
        close(theirs, want[0])


@pytest.mark.parametrize("options", [{"reduction": "none"},
                                     {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 10.0}])
def test_hf_per_sequence_loss_on_the_class_dimension(backend, options):
    # the per-sequence loss of SFT/DPO/eval code: F.cross_entropy(logits[:, :-1]
    # .transpose(1, 2), labels[:, 1:], reduction="none").sum(-1): (B, C, T) logits, a
    # non-contiguous view, (B, T) targets with -100; "none" returns (B, T)
    g = gen(26)
    z, labels = torch.randn(B, T, VOCAB, generator=g) * 5, torch.randint(0, VOCAB, (B, T),
                                                                          generator=g)
    labels[0, :3] = -100
    view = labels[:, 1:]
    leaf = z.clone().requires_grad_()
    loss = xt.cross_entropy(leaf[:, :-1].transpose(1, 2), view, backend=backend, **options)
    go = torch.rand(loss.shape, generator=g, dtype=torch.float64)
    loss.backward(go.float())
    ref = z.double().requires_grad_()
    rows = ref[:, :-1].reshape(-1, VOCAB)
    want = ref_loss(rows, view.reshape(-1), **options)
    want = want.reshape(view.shape) if options.get("reduction") == "none" else want
    want.backward(go)
    assert loss.shape == want.shape
    close(loss, want.detach())
    close(leaf.grad, ref.grad)


def test_hf_shift_labels_and_custom_ignore_index(backend):
    # ForCausalLMLoss(shift_labels=...): labels already shifted (context parallelism) are
    # used as given, not shifted again; a custom ignore_index pads the shift with itself
    h, w, labels = hf_batch(17)
    chunk = LINEAR_CHUNK[backend]
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    got = hf_ours(lambda a, b: causal_lm_loss(a, b, None, shift_labels=shifted,
                                              chunk_size=chunk), h, w)
    for a, e in zip(got, hf_reference(h, w, labels), strict=True):
        close(a, e)
    minus_one = torch.where(labels == -100, -1, labels)
    got = hf_ours(lambda a, b: causal_lm_loss(a, b, minus_one, ignore_index=-1,
                                              chunk_size=chunk), h, w)
    for a, e in zip(got, hf_reference(h, w, minus_one, ignore_index=-1), strict=True):
        close(a, e)


@pytest.mark.parametrize("num_items", [None, 17])
def test_hf_trainer_label_smoother(backend, num_items):
    # the Trainer's label_smoothing_factor: transformers.trainer_pt_utils.LabelSmoother
    # (shift_labels=True for causal LMs; the uniform part over active tokens and the
    # vocabulary; num_items_in_batch for both parts) is torch's label smoothing, i.e.
    # crossent's linear_cross_entropy(shift=True, label_smoothing=eps, num_items=n); run
    # here on float64 logits as the reference, values and gradients
    trainer_pt_utils = pytest.importorskip("transformers.trainer_pt_utils")
    h, w, labels = hf_batch(28)
    smoother = trainer_pt_utils.LabelSmoother(epsilon=0.1)
    want = hf_ours(lambda a, b: smoother({"logits": F.linear(a, b)}, labels, shift_labels=True,
                                         num_items_in_batch=num_items),
                   h.double(), w.double())
    kw = {} if num_items is None else {"num_items": num_items}
    got = hf_ours(lambda a, b: xt.linear_cross_entropy(
        a, b, labels, shift=True, label_smoothing=0.1, backend=backend,
        chunk_size=LINEAR_CHUNK[backend], **kw), h, w)
    for a, e in zip(got, want, strict=True):
        close(a, e)


def test_hf_gradient_accumulation_equals_the_full_batch(backend):
    # The Trainer's fix for gradient accumulation: every micro-batch divides its summed
    # loss by the whole batch's count of counted tokens; the micro-batches' losses and
    # gradients add up to the full batch's mean (the mean of micro-batch means does not)
    h, w, labels = hf_batch(18)
    count = int((labels[:, 1:] != -100).sum())
    want = hf_reference(h, w, labels)
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 1), slice(1, 3)):
        loss = causal_lm_loss(hl[rows], wl, labels[rows], num_items_in_batch=count,
                              chunk_size=LINEAR_CHUNK[backend])
        loss.backward()
        total = total + loss.detach()
    close(total, want[0])
    close(hl.grad, want[1])
    close(wl.grad, want[2])


def test_every_target_ignored(backend):
    # pytorch#116349 / #70348, torchtune#2341, NeMo Automodel#3796: torch gives NaN for a
    # "mean" over no counted target (and zero gradients), 0 for "sum", zeros for "none";
    # transformers' ForCausalLMLoss inherits the NaN, and so does num_items_in_batch=0
    # (0 / 0). crossent follows torch (guards such as "return 0" are the caller's choice)
    g = gen(19)
    z, y = logits(N, V, g), torch.full((N,), -100)
    for reduction in ("mean", "sum", "none"):
        loss, grad = run_ce(backend, z, y, reduction=reduction, label_smoothing=0.1,
                            z_loss=1e-4)
        want, want_grad = ref_ce(z, y, reduction=reduction, label_smoothing=0.1, z_loss=1e-4)
        assert torch.equal(loss.isnan(), want.isnan()) and (loss.isnan().all()
                                                             == (reduction == "mean"))
        close(loss, want)
        assert torch.equal(grad, torch.zeros_like(grad)) and torch.equal(
            want_grad, torch.zeros_like(want_grad))
    h, w, labels = hf_batch(20)
    labels[:] = -100
    chunk = LINEAR_CHUNK[backend]
    for items, expect_nan in ((None, True), (0, True), (5, False)):
        loss, dh, dw = hf_ours(lambda a, b, n=items: causal_lm_loss(
            a, b, labels, num_items_in_batch=n, chunk_size=chunk), h, w)
        want = hf_reference(h, w, labels, items)
        assert bool(loss.isnan()) == expect_nan == bool(want[0].isnan())
        if not expect_nan:
            assert loss == 0
        assert not dh.any() and not dw.any()  # torch: exact zeros, never NaN


def test_hf_bfloat16_model_upcasts_the_loss(backend):
    # ForCausalLMLoss upcasts the bf16 logits with .float(): the loss is float32 and
    # computed in float32; crossent's causal_lm_loss returns the same float32 loss from the
    # same bf16 logits, and bf16 gradients within bf16 rounding of transformers'
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    h, w, labels = hf_batch(21, torch.bfloat16)
    chunk = LINEAR_CHUNK[backend]
    ours = hf_ours(lambda a, b: causal_lm_loss(a, b, labels, chunk_size=chunk), h, w)
    theirs = hf_ours(lambda a, b: loss_utils.ForCausalLMLoss(F.linear(a, b), labels, VOCAB),
                     h, w)
    assert ours[0].dtype == theirs[0].dtype == torch.float32
    assert ours[1].dtype == ours[2].dtype == torch.bfloat16
    close(ours[0], theirs[0], rtol=1e-5)
    for a, t in zip(ours[1:], theirs[1:], strict=True):
        close(a, t, rtol=2.0 ** -7)


# ------------------------------------------------------------------ modules (drop-ins)
def test_modules_as_drop_ins_for_the_contenders_modules(backend):
    # LigerCrossEntropyLoss(weight, ignore_index, lse_square_scale, label_smoothing,
    # reduction, softcap) is crossent.torch.CrossEntropyLoss(weight, ignore_index=...,
    # z_loss=..., ...); LigerFusedLinearCrossEntropyLoss(ce_weight, ...)(lin.weight, x, y,
    # lin.bias) is LinearCrossEntropyLoss(in, classes, bias=True, weight=...)(x, y), whose
    # head is its own .linear (torch's state-dict keys)
    g = gen(22)
    z, y = logits(N, V, g, 20.0), targets(N, V, g, 42)
    cw = torch.rand(V, generator=g)
    module = xt.CrossEntropyLoss(cw, ignore_index=42, reduction="sum", label_smoothing=0.2,
                                 z_loss=1e-5, softcap=40.0, backend=backend)
    leaf = z.clone().requires_grad_()
    module(leaf, y).backward()
    want = ref_ce(z, y, cw, ignore_index=42, reduction="sum", label_smoothing=0.2,
                  z_loss=1e-5, softcap=40.0)
    close(leaf.grad, want[1])
    _, x, w, b = flce_data(23, 44, 31, 123, True)
    y = targets(44, 123, g, 42)
    cw = torch.rand(123, generator=g)
    head = xt.LinearCrossEntropyLoss(31, 123, bias=True, weight=cw, ignore_index=42,
                                     label_smoothing=0.1, z_loss=1e-4, softcap=30.0,
                                     chunk_size=LINEAR_CHUNK[backend], backend=backend)
    assert set(head.state_dict()) == {"weight", "linear.weight", "linear.bias"}
    with torch.no_grad():
        head.linear.weight.copy_(w)
        head.linear.bias.copy_(b)
    xl = x.clone().requires_grad_()
    loss = head(xl, y)
    loss.backward()
    want = ref_linear(x, w, b, y, weight=cw, ignore_index=42, label_smoothing=0.1,
                      z_loss=1e-4, softcap=30.0)
    for got, ref in zip((loss, xl.grad, head.linear.weight.grad, head.linear.bias.grad),
                        want, strict=True):
        close(got, ref)


@pytest.mark.parametrize("head", [False, True], ids=["cross_entropy", "linear"])
def test_token_statistics_as_the_contenders_extra_outputs(backend, head):
    # Liger's return_z_loss / return_token_accuracy and CCE's log-sum-exp are crossent's
    # statistics=: per token, from the same pass, on the softcapped logits; ignored rows
    # hold NaN (accuracy False), with the counted mask
    g = gen(24)
    x, w, b = torch.randn(N, 12, generator=g), torch.randn(V, 12, generator=g), None
    y = targets(N, V, g, -100)
    names = ("lse", "z_loss", "target_logprob", "accuracy", "entropy")
    kw = {"z_loss": 1e-3, "softcap": 5.0, "label_smoothing": 0.1, "backend": backend,
          "statistics": names}
    if head:
        _, stats = xt.linear_cross_entropy(x, w, y, b, chunk_size=LINEAR_CHUNK[backend], **kw)
    else:
        _, stats = xt.cross_entropy(F.linear(x, w), y, **kw)
    zc = 5.0 * torch.tanh(F.linear(x.double(), w.double()) / 5.0)
    counted = y != -100
    nan = torch.tensor(torch.nan, dtype=torch.float64)
    lse = torch.logsumexp(zc, 1)
    logp = torch.log_softmax(zc, 1)
    assert torch.equal(stats.counted, counted)
    close(stats.lse, torch.where(counted, lse, nan))
    close(stats.z_loss, torch.where(counted, 1e-3 * lse ** 2, nan))
    close(stats.target_logprob,
          torch.where(counted, logp.gather(1, y.clamp(min=0)[:, None])[:, 0], nan))
    close(stats.entropy, torch.where(counted, -(logp.exp() * logp).sum(1), nan))
    assert torch.equal(stats.accuracy, counted & (zc.argmax(1) == y))


@pytest.mark.parametrize("route", [
    pytest.param("auto", marks=pytest.mark.native_dispatch),
    "rowblock",  # once +inf: _rules.reduce_losses divided a positive smoothing sum by 0
])
@pytest.mark.parametrize("head", [False, True], ids=["cross_entropy", "linear"])
def test_zero_total_class_weight_with_label_smoothing_is_nan(route, head):
    # Liger PR #420 (class weights with label smoothing, the weighted denominator) and the
    # common "weight 0 for padding" instead of ignore_index: a batch of padding only
    g = gen(25)
    x, w = torch.randn(6, 8, generator=g), torch.randn(20, 8, generator=g)
    y = torch.tensor([3, 3, 7, -100, 7, 3])
    cw = torch.rand(20, generator=g)
    cw[3] = cw[7] = 0.0
    want, want_grad = ref_ce(F.linear(x, w), y, cw, label_smoothing=0.1)
    assert want.isnan() and want_grad[y != -100].isnan().all()
    if head:
        leaf = x.clone().requires_grad_()
        loss = xt.linear_cross_entropy(leaf, w, y, weight=cw, label_smoothing=0.1,
                                       backend=route, chunk_size=LINEAR_CHUNK[route])
    else:
        leaf = F.linear(x, w).requires_grad_()
        loss = xt.cross_entropy(leaf, y, cw, label_smoothing=0.1, backend=route)
    loss.backward()
    assert leaf.grad[y != -100].isnan().all() and not leaf.grad[y == -100].any()
    assert loss.isnan(), f"loss {loss.item()}, torch: NaN"


@pytest.mark.parametrize("options", [{"label_smoothing": 0.1},
                                     {"z_loss": 1e-3, "softcap": 20.0, "label_smoothing": 0.1},
                                     {"reduction": "none", "label_smoothing": 0.1}])
def test_padded_vocabulary_of_minus_infinity_logits(backend, options):
    # vocabularies padded to a multiple of 64 whose padding is masked with -inf (in the
    # logits, or the head's bias): torch's loss is finite, +inf with label smoothing (the
    # uniform part meets log 0), finite again under a softcap (c tanh(-inf / c) = -c); the
    # gradients finite and torch's in every case
    g = gen(27)
    z = torch.randn(N, V, generator=g) * 3
    z[:, V - 13:] = -torch.inf
    y = targets(N, V - 13, g, -100)
    go = row_grad_output(N, g) if options.get("reduction") == "none" else None
    (loss, grad), _ = check_ce(backend, z, y, grad_output=go, **options)
    assert torch.isfinite(grad).all()
    assert bool(torch.isinf(loss).any()) == (options.get("label_smoothing", 0) > 0
                                             and "softcap" not in options)
    x, w = torch.randn(N, 16, generator=g), torch.randn(V, 16, generator=g)
    b = torch.randn(V, generator=g)
    b[V - 13:] = -torch.inf
    _, *grads = check_linear(backend, x, w, b, y, go, **options)[0]
    assert all(torch.isfinite(t).all() for t in grads)
