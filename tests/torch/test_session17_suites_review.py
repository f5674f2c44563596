"""Session 17 trust round (helper H42): other projects' cross-entropy test suites and bug
reports, ported onto ``crossent.torch`` (facts only; no code copied).

Sources and the case each test ports (the test ids name them):

* Dao-AILab/flash-attention ``tests/losses/test_cross_entropy.py``: its
  ``CrossEntropyLoss(label_smoothing, logit_scale, lse_square_scale, return_z_loss,
  inplace_backward)`` against ``torch.nn.CrossEntropyLoss`` on ``x * logit_scale`` plus
  ``lse_square_scale * mean_kept(lse^2)``, ten targets ignored, a random ``grad_output``,
  an odd vocabulary. Mapping: ``lse_square_scale`` is crossent's ``z_loss`` (``z_loss *
  lse_n^2`` per counted row, divided by the same count as the loss when there are no class
  weights); ``logit_scale`` is the caller scaling the logits; ``return_z_loss`` is
  ``statistics="z_loss"`` (per-token, NaN on ignored rows); flash-attn's float32 loss
  from low-precision logits is ``loss_dtype=torch.float32``.
  Its ``inplace_backward`` is a bool: crossent's must refuse a string (``"False"`` from a
  config) by name, not act on its truthiness (it overwrote the logits before the fix).
  ``return_z_loss`` through a model head: the linear head's per-token statistics, with
  ignored rows skipped and counted rows gathered in chunks, must land on their rows.
* flash-attention ``tests/losses/test_cross_entropy_parallel.py`` (single-process part):
  logits ``* 10``, smoothing 0.9, ``reduction="none"`` with a per-row ``grad_output``.
* NVIDIA/Megatron-LM ``tests/unit_tests/tensor_parallel/test_cross_entropy.py``: logits
  ``0..7`` repeated along the vocabulary, targets ``0, 2, ..., 30``; the loss has a closed
  form (``7 + log(V/8 * sum_j e^-j) - t mod 8``), the gradient too.
* Megatron-LM issues #737 / #7464 (label smoothing with logits scaled by 1000: ``log(0)``
  after softmax underflow) and the convention crossent documents as equivalent
  (``crossent.integrations.conventions``: Megatron's ``eps`` on one partition is torch's
  ``eps C / (C - 1)``).
* pytorch/torchtune ``tests/torchtune/modules/loss/test_ce_chunked_output_loss.py``
  (``CEWithChunkedOutputLoss``: bfloat16 ``(B, T, V)`` logits in 8 chunks along ``T``,
  random ignored labels) and ``test_sft_losses.py`` / ``test_cross_entropy_loss.py``
  (``ChunkedCrossEntropyLoss(weight, hidden, targets)``, a linear head on ``(B, T, D)``).
* PyTorch ``test/test_nn.py``: label smoothing with probability targets and class weights
  (``test_cross_entropy_label_smoothing_with_probs``), index versus smoothed one-hot
  targets (``..._consistent_index_target_and_probs``), where the earlier rounds
  (``test_torch_suite_semantics.py``) had not.

References: ``torch.nn.functional.cross_entropy`` in float64 on the same (rounded)
values, closed forms, or the formula written out by hand in float64; never crossent.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError
from crossent.torch import _backends, _small

pytestmark = pytest.mark.timeout(120)

BACKENDS = ["auto", "rowblock", "native"]
ROUTES = ["auto", "rowblock", "small", "native"]
F64 = torch.float64


@pytest.fixture
def small_route(monkeypatch):
    """``route`` -> the ``backend=`` to pass: ``"small"`` is ``"auto"`` with the small-batch
    fused kernel's threshold lowered to one logit (it serves float32/float64 index targets
    without weights or smoothing)."""

    calls = []
    real = _small._SmallCrossEntropy.apply

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(_small._SmallCrossEntropy, "apply", spy)

    def backend_for(route: str) -> str:
        if route == "small":
            monkeypatch.setattr(_backends, "SMALL_MIN_LOGITS", 1)
            monkeypatch.setattr(_backends, "NATIVE_MAX_LOGITS", 1 << 19)  # conftest's 0
            return "auto"
        return route

    backend_for.calls = calls  # type: ignore[attr-defined]
    return backend_for


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _close(got, want, rtol, atol, what=""):
    torch.testing.assert_close(got.detach().to(F64), want.detach().to(F64), rtol=rtol,
                               atol=atol, msg=lambda m: f"{what}: {m}")


def _grad_close(got, want, dtype, what=""):
    """Gradients: float32/float64 to rounding, low precision to one rounding of the
    largest entry (the gradient is rounded once to the logits' dtype)."""
    scale = want.abs().max().item() or 1.0
    if dtype in (torch.float32, F64):
        _close(got, want, 1e-4, 1e-6 * scale, what)
    else:
        _close(got, want, 2e-2, 8e-3 * scale, what)


def _flash_reference(x64, y, smoothing, lse_square_scale, ignore_index=-100):
    """flash-attention's test reference in float64: torch's mean loss plus
    ``lse_square_scale * mean_kept(lse^2)``."""
    out = F.cross_entropy(x64, y, label_smoothing=smoothing, ignore_index=ignore_index)
    if lse_square_scale:
        lse = torch.logsumexp(x64, dim=-1)
        out = out + lse_square_scale * (lse[y != ignore_index] ** 2).mean()
    return out


def _flash_data(dtype, rows=48, vocab=4099, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g).to(dtype)
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[torch.randperm(rows, generator=g)[:10]] = -100
    return x, y


# ---------------------------------------------------------------- flash-attention ----


@pytest.mark.parametrize("backend", ["auto", "rowblock"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("inplace_backward", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("lse_square_scale,logit_scale,smoothing",
                         [(0.0, 1.0, 0.0), (1e-2, 1.0, 0.0), (0.0, 0.7, 0.9),
                          (1e-2, 0.7, 0.9)],
                         ids=["plain", "zloss", "scale-smooth", "zloss-scale-smooth"])
def test_flash_attn_cross_entropy_loss(backend, dtype, inplace_backward, lse_square_scale,
                                       logit_scale, smoothing):
    """flash-attention test_cross_entropy_loss: loss (float32 out) and d/dx against torch
    on ``x * logit_scale`` plus the z-loss, with a random ``grad_output``."""
    x0, y = _flash_data(dtype)
    x = x0.clone().requires_grad_()
    logits = x * logit_scale if logit_scale != 1.0 else x
    model = xt.CrossEntropyLoss(label_smoothing=smoothing, z_loss=lse_square_scale,
                                inplace_backward=inplace_backward, loss_dtype=torch.float32,
                                backend=backend)  # flash-attn's module, crossent's names
    out = model(logits, y)
    assert out.dtype == torch.float32
    x64 = x0.to(F64).requires_grad_()
    ref = _flash_reference(x64 * logit_scale, y, smoothing, lse_square_scale)
    _close(out, ref, 2e-5, 2e-6, "loss")
    g = torch.randn((), generator=torch.Generator().manual_seed(1))
    out.backward(g)
    ref.backward(g.to(F64))
    assert torch.equal(x.detach(), x0), "leaf logits changed (inplace_backward on a leaf)"
    _grad_close(x.grad, x64.grad, dtype, "dx")


def test_flash_attn_lse_square_scale_on_native_backend_is_refused_by_name():
    """flash-attention's z-loss on torch's own kernel: torch has no z-loss, so
    ``backend="native"`` must refuse it by name (never drop it)."""
    x, y = _flash_data(torch.float32, rows=8, vocab=33)
    with pytest.raises(UnsupportedError, match="z_loss"):
        xt.cross_entropy(x, y, z_loss=1e-2, backend="native")


@pytest.mark.parametrize("value", ["False", "no"])
@pytest.mark.parametrize("entry", ["function", "module"])
def test_flash_attn_inplace_backward_must_be_a_bool(entry, value):
    """flash-attention's ``inplace_backward`` is a bool; a string (``"False"`` read from a
    config) must raise InputError naming ``inplace_backward`` and leave the logits
    intact (rule 6: bad input names the argument), never act as ``True``."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 40, generator=g).requires_grad_()
    y = torch.randint(0, 40, (6,), generator=g)
    logits = x * 2.0  # an activation: inplace_backward=True would overwrite it
    keep = logits.detach().clone()
    with pytest.raises(InputError, match="inplace_backward"):
        if entry == "function":
            xt.cross_entropy(logits, y, inplace_backward=value, backend="rowblock")
        else:
            xt.CrossEntropyLoss(inplace_backward=value, backend="rowblock")(logits, y)
    assert torch.equal(logits.detach(), keep), "the logits were overwritten"


@pytest.mark.parametrize("backend", ["auto", "rowblock"])
@pytest.mark.parametrize("smoothing", [0.0, 0.9])
def test_flash_attn_return_z_loss_as_statistics(backend, smoothing):
    """flash-attention return_z_loss=True: the second output is
    ``lse_square_scale * mean_kept(lse^2)``; crossent's per-token ``statistics="z_loss"``
    averaged over the counted rows must equal it, and the loss must still include it."""
    x, y = _flash_data(torch.float32, vocab=1031)
    out, stats = xt.cross_entropy(x, y, label_smoothing=smoothing, z_loss=1e-2,
                                  statistics="z_loss", backend=backend)
    lse = torch.logsumexp(x.to(F64), dim=-1)
    kept = y != -100
    want_z = 1e-2 * (lse[kept] ** 2).mean()
    assert torch.equal(stats.counted, kept)
    assert stats.z_loss[~kept].isnan().all()
    _close(stats.z_loss[kept].mean(), want_z, 1e-5, 1e-7, "z_loss statistic")
    _close(out, _flash_reference(x.to(F64), y, smoothing, 1e-2), 2e-5, 2e-6, "loss")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("inplace_backward", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("smoothing", [0.0, 0.9])
def test_flash_attn_parallel_case_large_logits_reduction_none(small_route, route,
                                                              inplace_backward, smoothing):
    """flash-attention test_cross_entropy_loss_parallel (world_size=1): logits ``* 10``,
    ``reduction="none"``, a random per-row ``grad_output``, on a non-leaf activation (so
    ``inplace_backward`` really overwrites it)."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(64, 1000, generator=g) * 10
    y = torch.randint(0, 1000, (64,), generator=g)
    y[torch.randperm(64, generator=g)[:10]] = -100
    backend = small_route(route)
    x = x0.clone().requires_grad_()
    act = x * 1.0 + 0.0  # a non-leaf activation
    out = xt.cross_entropy(act, y, label_smoothing=smoothing, reduction="none",
                           inplace_backward=inplace_backward, backend=backend)
    x64 = x0.to(F64).requires_grad_()
    ref = F.cross_entropy(x64, y, label_smoothing=smoothing, reduction="none")
    _close(out, ref, 1e-5, 1e-5, "loss")
    go = torch.randn(64, generator=g)
    out.backward(go)
    ref.backward(go.to(F64))
    _grad_close(x.grad, x64.grad, torch.float32, "dx")
    assert (x.grad[y == -100] == 0).all()
    assert bool(small_route.calls) == (route == "small" and not smoothing)


@pytest.mark.parametrize("backend", ["auto", "rowblock"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_flash_attn_return_z_loss_through_the_linear_head(backend, chunk_size):
    """flash-attention's return_z_loss for a model head (its GPT models feed the LM head's
    logits to the loss): ``linear_cross_entropy(..., statistics=...)`` skips ignored rows
    and gathers the counted ones in chunks; every per-token statistic must land on its own
    row (NaN / False on the ignored ones), against float64 torch on the whole logits."""
    g = torch.Generator().manual_seed(4)
    N, D, C = 23, 8, 37
    x = torch.randn(N, D, generator=g, dtype=F64)
    w = torch.randn(C, D, generator=g, dtype=F64)
    b = torch.randn(C, generator=g, dtype=F64)
    y = torch.randint(0, C, (N,), generator=g)
    y[[0, 3, 4, 10, 22]] = -100
    names = ("lse", "z_loss", "target_logprob", "accuracy", "entropy")
    out, stats = xt.linear_cross_entropy(x, w, y, b, ignore_index=-100, z_loss=1e-2,
                                         chunk_size=chunk_size, backend=backend,
                                         statistics=names)
    z = F.linear(x, w, b)
    lse, logp = torch.logsumexp(z, 1), torch.log_softmax(z, 1)
    kept = y != -100
    want = {"lse": lse, "z_loss": 1e-2 * lse ** 2,
            "target_logprob": logp.gather(1, y.clamp(min=0)[:, None])[:, 0],
            "entropy": -(logp.exp() * logp).sum(1)}
    assert torch.equal(stats.counted, kept)
    assert torch.equal(stats.accuracy, (z.argmax(1) == y) & kept)
    for name, value in want.items():
        got = getattr(stats, name)
        assert got[~kept].isnan().all(), name
        _close(got[kept], value[kept], 1e-10, 1e-12, name)
    ref = F.cross_entropy(z, y) + (want["z_loss"][kept]).mean()
    _close(out, ref, 1e-10, 1e-12, "loss")


# ---------------------------------------------------------------------- Megatron ----


def _megatron_logits(rows=16, vocab=128):
    return torch.arange(8, dtype=torch.float32).repeat(rows, vocab // 8)


def _megatron_closed_form(target, vocab=128):
    """``lse = 7 + log(vocab / 8 * sum_{j<8} e^-j)``; the target's logit is ``t mod 8``."""
    lse = 7.0 + math.log(vocab / 8 * sum(math.exp(-j) for j in range(8)))
    return torch.tensor([lse - (int(t) % 8) for t in target], dtype=F64)


@pytest.mark.parametrize("route", ROUTES)
def test_megatron_vocab_parallel_cross_entropy_closed_form(small_route, route):
    """Megatron-LM test_vocab_parallel_cross_entropy, single process: ``0..7`` repeated
    over 128 classes, targets ``0, 2, ..., 30``; expected 10.2309, 8.2309, 6.2309, 4.2309
    (repeated) in closed form, and the gradient ``softmax - onehot`` per row."""
    backend = small_route(route)
    z = _megatron_logits().requires_grad_()
    t = torch.arange(0, 32, 2)
    out = xt.cross_entropy(z, t, reduction="none", backend=backend)
    want = _megatron_closed_form(t)
    _close(out, want, 1e-6, 1e-6, "loss")
    assert [round(v, 4) for v in out[:4].tolist()] == [10.2309, 8.2309, 6.2309, 4.2309]
    out.sum().backward()
    lse = 7.0 + math.log(16 * sum(math.exp(-j) for j in range(8)))
    p = torch.exp(torch.arange(8, dtype=F64) - lse).repeat(16)  # p_c = e^(z_c - lse)
    expected = p.expand(16, 128).clone()
    expected[torch.arange(16), t] -= 1.0
    _close(z.grad, expected, 1e-5, 1e-7, "dz")
    assert bool(small_route.calls) == (route == "small")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_megatron_label_smoothing_convention_single_partition(backend, scale):
    """Megatron-LM #737 / #7464: label smoothing on one partition (``P = 1``) keeps
    ``1 - eps`` on the target and spreads ``eps`` over the ``C - 1`` other classes;
    crossent documents it as torch's ``label_smoothing = eps C / (C - 1)``. Logits scaled
    by 1000 (the reports' ``log(0)`` after softmax underflow) must stay finite."""
    g = torch.Generator().manual_seed(5)
    C, eps = 16, 0.1
    z0 = torch.randn(12, C, generator=g) * scale
    t = torch.randint(0, C, (12,), generator=g)
    t[3] = -100
    z = z0.clone().requires_grad_()
    out = xt.cross_entropy(z, t, label_smoothing=eps * C / (C - 1), backend=backend)
    z64 = z0.to(F64).requires_grad_()
    logp = torch.log_softmax(z64, dim=1)
    q = torch.full((12, C), eps / (C - 1), dtype=F64)
    kept = t != -100
    q[kept.nonzero().squeeze(1), t[kept]] = 1.0 - eps
    ref = -(q * logp).sum(1)[kept].sum() / kept.sum()
    assert out.isfinite()
    _close(out, ref, 2e-6, 1e-6 * scale, "loss")
    out.backward()
    ref.backward()
    _grad_close(z.grad, z64.grad, torch.float32, "dz")


# --------------------------------------------------------------------- torchtune ----


@pytest.mark.parametrize("backend", ["auto", "rowblock", "native"])
def test_torchtune_ce_with_chunked_output_loss(backend):
    """torchtune CEWithChunkedOutputLoss: bfloat16 ``(3, 50, 50)`` logits split in 8
    chunks along the sequence, about a fifth of the labels ignored. With crossent each
    chunk's sum over the whole batch's count (``num_items``) adds up to torch's full-batch
    mean (float32 loss); the gradient of every chunk too. One chunk has every label
    ignored (its part is exactly 0, not NaN)."""
    g = torch.Generator().manual_seed(42)
    B, T, V = 3, 50, 50
    logits0 = torch.randn(B, T, V, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.randint(0, T, (B, T), generator=g) < T // 5] = -100
    labels[:, :7] = -100  # the first chunk (7 positions) ignored everywhere
    count = int((labels != -100).sum())
    logits = logits0.clone().requires_grad_()
    total = 0.0
    for chunk, lab in zip(logits.chunk(8, dim=1), labels.chunk(8, dim=1), strict=True):
        part = xt.cross_entropy(chunk.reshape(-1, V), lab.reshape(-1), num_items=count,
                                loss_dtype=torch.float32, backend=backend)
        assert part.isfinite()
        total = total + part
    l64 = logits0.to(F64).requires_grad_()
    ref = F.cross_entropy(l64.reshape(-1, V), labels.reshape(-1))
    _close(total, ref, 1e-5, 1e-6, "loss")
    total.backward()
    ref.backward()
    _grad_close(logits.grad, l64.grad, torch.bfloat16, "dlogits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_torchtune_sequence_logits_on_the_class_dimension(backend):
    """torchtune's ``(B, T, V)`` logits given to crossent as torch takes them, class
    dimension 1: ``cross_entropy(logits.transpose(1, 2), labels)`` (a non-contiguous
    K-dimensional input), value and gradient against the flattened float64 loss."""
    g = torch.Generator().manual_seed(8)
    logits0 = torch.randn(2, 9, 37, generator=g)
    labels = torch.randint(0, 37, (2, 9), generator=g)
    labels[0, :3] = -100
    logits = logits0.clone().requires_grad_()
    out = xt.cross_entropy(logits.transpose(1, 2), labels, label_smoothing=0.1,
                           backend=backend)
    l64 = logits0.to(F64).requires_grad_()
    ref = F.cross_entropy(l64.reshape(-1, 37), labels.reshape(-1), label_smoothing=0.1)
    _close(out, ref, 1e-5, 1e-6, "loss")
    out.backward()
    ref.backward()
    _grad_close(logits.grad, l64.grad, torch.float32, "dlogits")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
def test_torchtune_chunked_linear_cross_entropy(backend, bias):
    """torchtune ChunkedCrossEntropyLoss(weight, hidden, targets): ``(2, 8, 16)`` hidden
    states, a ``(100, 16)`` head, about 20% ignored targets; crossent's linear head on the
    flattened rows (it refuses ``(B, T, D)`` by name, torch's RuntimeError) in chunks of
    3 rows: value and the gradients of hidden, weight and bias against float64 torch."""
    g = torch.Generator().manual_seed(42)
    hidden0 = torch.randn(2, 8, 16, generator=g)
    w0 = torch.randn(100, 16, generator=g)
    b0 = torch.randn(100, generator=g) if bias else None
    targets = torch.randint(0, 100, (2, 8), generator=g)
    targets[torch.rand(2, 8, generator=g) < 0.2] = -100
    hidden, w = hidden0.clone().requires_grad_(), w0.clone().requires_grad_()
    b = b0.clone().requires_grad_() if bias else None
    with pytest.raises(InputError, match="input"):  # torch: a RuntimeError
        xt.linear_cross_entropy(hidden, w, targets, b, backend=backend)
    out = xt.linear_cross_entropy(hidden.reshape(-1, 16), w, targets.reshape(-1), b,
                                  ignore_index=-100, chunk_size=3, backend=backend)
    h64, w64 = hidden0.to(F64).requires_grad_(), w0.to(F64).requires_grad_()
    b64 = b0.to(F64).requires_grad_() if bias else None
    ref = F.cross_entropy(F.linear(h64, w64, b64).reshape(-1, 100), targets.reshape(-1))
    _close(out, ref, 1e-5, 1e-5, "loss")
    out.backward()
    ref.backward()
    _grad_close(hidden.grad, h64.grad, torch.float32, "dhidden")
    _grad_close(w.grad, w64.grad, torch.float32, "dW")
    if bias:
        _grad_close(b.grad, b64.grad, torch.float32, "db")


# ------------------------------------------------------------------ torch test_nn ----


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_nn_label_smoothing_with_probs_and_weights(backend, reduction):
    """PyTorch test_cross_entropy_label_smoothing_with_probs, with class weights: soft
    targets smoothed as ``(1 - eps) t + eps / C`` then weighted; the loss and the
    gradients of the logits, the target and the weights against the formula written out
    in float64."""
    g = torch.Generator().manual_seed(11)
    N, C, eps = 6, 5, 0.3
    z0 = torch.randn(N, C, generator=g, dtype=F64)
    t0 = torch.softmax(torch.randn(N, C, generator=g, dtype=F64), 1)
    w0 = torch.rand(C, generator=g, dtype=F64) + 0.5
    z, t, w = (a.clone().requires_grad_() for a in (z0, t0, w0))
    out = xt.cross_entropy(z, t, weight=w, label_smoothing=eps, reduction=reduction,
                           backend=backend)
    rz, rt, rw = (a.clone().requires_grad_() for a in (z0, t0, w0))
    rows = -(((1 - eps) * rt + eps / C) * rw * torch.log_softmax(rz, 1)).sum(1)
    ref = rows.mean() if reduction == "mean" else rows.sum() if reduction == "sum" else rows
    _close(out, ref, 1e-10, 1e-12, "loss")
    go = torch.randn(ref.shape, generator=g, dtype=F64)
    out.backward(go)
    ref.backward(go)
    for got, want, what in [(z.grad, rz.grad, "dz"), (t.grad, rt.grad, "dt"),
                            (w.grad, rw.grad, "dw")]:
        _close(got, want, 1e-9, 1e-11, what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_nn_smoothing_index_target_equals_smoothed_one_hot(backend):
    """PyTorch test_cross_entropy_label_smoothing_consistent_index_target_and_probs: with
    index targets and smoothing, the loss and gradient equal those of the one-hot target
    smoothed by hand (no weights, nothing ignored), in float64."""
    g = torch.Generator().manual_seed(12)
    N, C, eps = 7, 4, 0.2
    z0 = torch.randn(N, C, 3, generator=g, dtype=F64)
    y = torch.randint(0, C, (N, 3), generator=g)
    z = z0.clone().requires_grad_()
    out = xt.cross_entropy(z, y, label_smoothing=eps, backend=backend)
    rz = z0.clone().requires_grad_()
    q = F.one_hot(y, C).movedim(-1, 1).to(F64) * (1 - eps) + eps / C
    ref = -(q * torch.log_softmax(rz, 1)).sum(1).mean()
    _close(out, ref, 1e-12, 1e-12, "loss")
    out.backward()
    ref.backward()
    _close(z.grad, rz.grad, 1e-10, 1e-13, "dz")
