"""crossent.integrations.conventions against the libraries themselves (torch, optax, Keras) and,
for Megatron-LM (not installable here), a float64 NumPy transcription of the arithmetic of
``megatron/core/tensor_parallel/cross_entropy.py`` run partition by partition."""

from __future__ import annotations

import os

import numpy as np
import pytest

from crossent import InputError
from crossent.integrations.conventions import (
    CONVENTIONS,
    convention_loss,
    convention_terms,
    explain,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional


def make_data(seed, n=7, c=12):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=3.0, size=(n, c))
    y = rng.integers(0, c, size=n)
    y[[1, 4]] = -100
    return z, y


def megatron_reference(z, y, eps, partitions, rank):
    """Megatron's vocab_parallel_cross_entropy for one rank, then the masked mean."""
    n, c = z.shape
    width = c // partitions
    parts = [z[:, r * width:(r + 1) * width] for r in range(partitions)]
    logits_max = np.max([p.max(axis=-1) for p in parts], axis=0)  # all-reduce MAX
    predicted = np.zeros(n)
    sum_exp = np.zeros(n)
    for r, p in enumerate(parts):  # all-reduce SUM of the target logit and of sum exp
        shifted = p - logits_max[:, None]
        inside = (y >= r * width) & (y < (r + 1) * width)
        idx = np.where(inside, y - r * width, 0)
        predicted += np.where(inside, shifted[np.arange(n), idx], 0.0)
        sum_exp += np.exp(shifted).sum(axis=-1)
    loss = np.log(sum_exp) - predicted
    if eps > 0:
        smoothing = eps * width / (width - 1)
        probs = np.exp(parts[rank] - logits_max[:, None]) / sum_exp[:, None]
        loss = (1.0 - smoothing) * loss - smoothing * np.log(probs).mean(axis=-1)
    mask = (y != -100).astype(float)
    return (loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_torch_convention_is_torch(seed, eps):
    z, y = make_data(seed)
    zt = torch.tensor(z, requires_grad=True)
    ref = F.cross_entropy(zt, torch.tensor(y), ignore_index=-100, label_smoothing=eps)
    zc = torch.tensor(z, requires_grad=True)
    ours = convention_loss(zc, torch.tensor(y), "torch", label_smoothing=eps)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    ref.backward()
    ours.backward()
    torch.testing.assert_close(zc.grad, zt.grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_optax_convention_is_optax(eps):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = jax.numpy
    z, y = make_data(2)
    mask = y != -100
    safe = np.where(mask, y, 0)
    zj = jnp.asarray(z, dtype=jnp.float64)
    if eps:
        rows = optax.softmax_cross_entropy(zj, optax.smooth_labels(
            jax.nn.one_hot(safe, z.shape[1], dtype=jnp.float64), eps))
    else:
        rows = optax.softmax_cross_entropy_with_integer_labels(zj, jnp.asarray(safe))
    ref = float(jnp.mean(rows * mask))
    assert float(convention_loss(z, y, "optax", label_smoothing=eps)) == pytest.approx(
        ref, rel=1e-12)
    # the same from jax arrays, in jax
    ours = convention_loss(zj, jnp.asarray(y), "optax", label_smoothing=eps)
    assert float(ours) == pytest.approx(ref, rel=1e-12)


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")  # Keras 3 defaults to TensorFlow
    pytest.importorskip("jax")
    return pytest.importorskip("keras")


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_keras_conventions_are_keras(eps):
    keras = _keras()
    z, y = make_data(8)
    mask = (y != -100).astype(np.float32)
    one_hot = np.eye(z.shape[1], dtype=np.float32)[np.where(y != -100, y, 0)]
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=eps)
    ref = float(loss(one_hot, z.astype(np.float32), sample_weight=mask))
    assert float(convention_loss(z, y, "keras", label_smoothing=eps)) == pytest.approx(
        ref, rel=2e-6)
    sparse = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100)
    ref = float(sparse(y, z.astype(np.float32)))
    assert float(convention_loss(z, y, "keras-sparse")) == pytest.approx(ref, rel=2e-6)
    if eps:
        with pytest.raises(InputError, match="label_smoothing"):
            convention_loss(z, y, "keras-sparse", label_smoothing=eps)


def test_keras_binary_label_smoothing_moves_targets_halfway():
    """The module's claim: BinaryCrossentropy(label_smoothing=eps) is the BCE of
    (1 - eps) y + eps / 2."""
    keras = _keras()
    rng = np.random.default_rng(9)
    z = rng.normal(size=(6, 3)).astype(np.float32)
    y = (rng.uniform(size=(6, 3)) < 0.5).astype(np.float32)
    for eps in (0.0, 0.2):
        ref = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=eps)(y, z)
        moved = F.binary_cross_entropy_with_logits(
            torch.tensor(z, dtype=torch.float64), torch.tensor((1 - eps) * y + eps / 2,
                                                               dtype=torch.float64))
        assert float(ref) == pytest.approx(float(moved), rel=2e-6)


def test_soft_targets_agree_between_torch_and_optax():
    """The module's claim: neither renormalises a probability target, both smooth it as
    (1 - eps) t + eps / C."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    z, _ = make_data(3)
    t = np.random.default_rng(3).uniform(size=z.shape)  # rows sum to about 6, not 1
    for eps in (0.0, 0.2):
        ref_torch = F.cross_entropy(torch.tensor(z), torch.tensor(t), label_smoothing=eps)
        ref_optax = optax.softmax_cross_entropy(
            jax.numpy.asarray(z), optax.smooth_labels(jax.numpy.asarray(t), eps)).mean()
        assert float(ref_torch) == pytest.approx(float(ref_optax), rel=1e-12)


@pytest.mark.parametrize(("partitions", "rank"), [(1, 0), (2, 0), (2, 1), (3, 2), (4, 1)])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_megatron_convention_is_megatrons_arithmetic(partitions, rank, eps):
    z, y = make_data(4)
    ref = megatron_reference(z, y, eps, partitions, rank)
    ours = convention_loss(z, y, "megatron", label_smoothing=eps,
                           tensor_parallel_size=partitions, rank=rank)
    assert float(ours) == pytest.approx(ref, rel=1e-12)


def test_megatron_with_one_partition_is_torch_with_rescaled_smoothing():
    """Megatron gives the target 1 - eps and each other class eps / (C - 1): that is
    torch's target distribution with label_smoothing = eps C / (C - 1)."""
    z, y = make_data(5)
    c, eps = z.shape[1], 0.2
    zc = torch.tensor(z, requires_grad=True)
    ours = convention_loss(zc, torch.tensor(y), "megatron", label_smoothing=eps)
    zt = torch.tensor(z, requires_grad=True)
    ref = F.cross_entropy(zt, torch.tensor(y), label_smoothing=eps * c / (c - 1))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    ref.backward()
    ours.backward()
    torch.testing.assert_close(zc.grad, zt.grad, rtol=1e-10, atol=1e-15)
    # the same as an explicit probability target, torch's probability-target path
    keep = y != -100
    target = np.full(z.shape, eps / (c - 1))
    target[np.arange(len(y)), np.where(keep, y, 0)] = 1.0 - eps
    explicit = F.cross_entropy(torch.tensor(z[keep]), torch.tensor(target[keep]))
    torch.testing.assert_close(ours.detach(), explicit, rtol=1e-12, atol=0)


def test_terms_rebuild_the_loss_and_explain_marks_the_differences():
    z, y = make_data(6)
    for name, convention in CONVENTIONS.items():
        eps = 0.0 if convention.smoothing == "none" else 0.1
        t = convention_terms(z, y, name, label_smoothing=eps)
        rebuilt = (t.nll_weight * t.nll_sum + t.smoothing_weight * t.smoothing_sum)
        assert float(t.loss) == pytest.approx(float(rebuilt / t.denominator), rel=1e-14)
    starred = [line.split()[0] for line in explain(z, y, "torch", "optax",
                                                   label_smoothing=0.1).splitlines()
               if line.endswith("*")]
    assert starred == ["D", "loss"]
    starred = [line.split()[0] for line in explain(z, y, "torch", "megatron",
                                                   label_smoothing=0.1).splitlines()
               if line.endswith("*")]
    assert starred == ["1", "s", "loss"]
    text = explain(z, y, "torch", "megatron", label_smoothing=0.1, tensor_parallel_size=2,
                   rank=1)
    assert "[0, 12)" in text and "[6, 12)" in text
    assert "*" not in explain(z, y, "torch", "torch", label_smoothing=0.1)
    # no smoothing, no ignored rows: all agree
    full = np.arange(len(y)) % z.shape[1]
    values = [float(convention_loss(z, full, c)) for c in CONVENTIONS]
    assert values == pytest.approx([values[0]] * len(CONVENTIONS), rel=1e-14)


def test_bad_input_names_the_argument():
    z, y = make_data(7)
    cases = [
        ({"convention": "tensorflow"}, "convention"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"convention": "megatron", "tensor_parallel_size": 5}, "tensor_parallel_size"),
        ({"convention": "megatron", "tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"convention": "megatron", "tensor_parallel_size": 2, "rank": 2}, "rank"),
        ({"convention": "torch", "tensor_parallel_size": 2}, "tensor_parallel_size"),
        ({"convention": "megatron", "label_smoothing": 1.0}, "label_smoothing"),
        ({"convention": "megatron", "tensor_parallel_size": 12, "label_smoothing": 0.1},
         "label_smoothing"),
    ]
    for kwargs, name in cases:
        with pytest.raises(InputError, match=name):
            convention_loss(z, y, **kwargs)
    with pytest.raises(InputError, match="logits"):
        convention_loss(z[0], y[:1])
    from crossent.integrations.conventions import Convention

    for bad in (Convention("x", "some", "kept", ""), Convention("x", "all", "rows", ""),
                Convention("x", "all", "kept", "", nothing_kept="inf")):
        with pytest.raises(InputError, match="convention"):
            convention_loss(z, y, bad)
    # a Convention built by hand: Keras' ignore_class rule with torch's smoothing
    mine = Convention("mine", "all", "kept", "", nothing_kept="zero")
    assert float(convention_loss(z, np.full_like(y, -100), mine)) == 0.0
    assert float(convention_loss(z, y, mine, label_smoothing=0.1)) == pytest.approx(
        float(convention_loss(z, y, "torch", label_smoothing=0.1)), rel=1e-14)


@pytest.mark.parametrize(("case", "ignore_index"),
                         [("all-ignored", -100), ("one-kept", -100), ("valid-class", 3)])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_edge_cases_against_the_libraries(case, ignore_index, eps):
    """Every row ignored (torch: NaN; optax, Keras: 0), one row kept, and an ignore_index
    that is a valid class, against torch, optax and Keras themselves."""
    import warnings

    z, _ = make_data(10, n=5, c=6)
    y = {"all-ignored": np.full(5, -100), "one-kept": np.array([-100, -100, 2, -100, -100]),
         "valid-class": np.array([3, 1, 3, 0, 5])}[case]
    kwargs = {"label_smoothing": eps, "ignore_index": ignore_index}
    ref = F.cross_entropy(torch.tensor(z), torch.tensor(y), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN as torch's, without NumPy's 0 / 0 warning
        ours = convention_loss(z, y, "torch", **kwargs)
    torch.testing.assert_close(torch.tensor(float(ours), dtype=torch.float64), ref,
                               rtol=1e-12, atol=0, equal_nan=True)
    torch.testing.assert_close(convention_loss(torch.tensor(z), torch.tensor(y), "torch",
                                               **kwargs), ref, rtol=1e-12, atol=0,
                               equal_nan=True)
    megatron = megatron_reference(z, np.where(y == ignore_index, -100, y), eps, 1, 0) \
        if case != "all-ignored" else float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = float(convention_loss(z, y, "megatron", **kwargs))
    assert got == pytest.approx(megatron, rel=1e-12, nan_ok=True)
    mask = y != ignore_index
    safe = np.where(mask, y, 0)
    optax = pytest.importorskip("optax")
    jax = pytest.importorskip("jax")
    rows = optax.softmax_cross_entropy(jax.numpy.asarray(z), optax.smooth_labels(
        jax.nn.one_hot(safe, z.shape[1], dtype=jax.numpy.float64), eps))
    assert float(convention_loss(z, y, "optax", **kwargs)) == pytest.approx(
        float(jax.numpy.mean(rows * mask)), rel=1e-12)
    keras = _keras()
    one_hot = np.eye(z.shape[1], dtype=np.float32)[safe]
    ref = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=eps)(
        one_hot, z.astype(np.float32), sample_weight=mask.astype(np.float32))
    assert float(convention_loss(z, y, "keras", **kwargs)) == pytest.approx(float(ref),
                                                                          rel=2e-6, abs=1e-7)
    if eps == 0:  # Keras' ignore_class mean: 0 (divide_no_nan) when nothing is kept
        ref = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=ignore_index)(y, z.astype(np.float32))
        for logits in (z, torch.tensor(z)):
            got = float(convention_loss(logits, torch.tensor(y) if torch.is_tensor(logits)
                                        else y, "keras-sparse", ignore_index=ignore_index))
            assert got == pytest.approx(float(ref), rel=2e-6, abs=1e-7)


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_narrow_unsigned_target_counts_as_the_loss_does(library, eps):
    # a uint8 target's 156 is a class: compared with ignore_index=-100 in uint8 it wrapped
    # to -100 (torch: counted as ignored, the mean's denominator too small; NumPy 2:
    # OverflowError). Found by the session-16 review of global_num_items' same pattern.
    g = torch.Generator().manual_seed(6)
    z = torch.randn(3, 200, generator=g, dtype=torch.float64)
    y = torch.tensor([156, 1, 2])
    want = F.cross_entropy(z, y, label_smoothing=eps)
    narrow = y.to(torch.uint8) if library == "torch" else y.numpy().astype(np.uint8)
    got = convention_loss(z if library == "torch" else z.numpy(), narrow, "torch",
                          label_smoothing=eps)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-12)
