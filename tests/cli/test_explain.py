"""``crossent explain``: every intermediate printed, each checked against math."""

from __future__ import annotations

import math

from crossent.cli import app

from .conftest import f6


def softmax(a: list[float]) -> list[float]:
    total = sum(math.exp(v) for v in a)
    return [math.exp(v) / total for v in a]


def test_probs_with_index_target(runner):
    result = runner.invoke(app, ["explain", "--probs", "0.1,0.2,0.7", "--target", "2"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"loss = sum of the terms = {f6(math.log2(1 / 0.7))} bits" in out
    assert f"({f6(math.log(1 / 0.7))} nats)" in out
    for g in (0.1, 0.2, -0.3):  # softmax(log q) - one-hot
        assert f6(g) in out


def test_logits_vector_target_smoothing_in_nats(runner):
    a, alpha = [1.2, 0.3, 2.0], 0.1
    args = ["explain", "--logits", "1.2,0.3,2.0", "--target", "0,0,1",
            "--label-smoothing", "0.1", "--base", "e"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    q = softmax(a)
    t = [alpha / 3, alpha / 3, 1 - alpha + alpha / 3]
    terms = [ti * math.log(1 / qi) for ti, qi in zip(t, q, strict=True)]
    out = result.stdout
    for value in [*q, *t, *terms, *(qi - ti for qi, ti in zip(q, t, strict=True))]:
        assert f6(value) in out
    assert f"{f6(sum(terms))} nats" in out
    assert f"({f6(sum(terms) / math.log(2))} bits)" in out


def test_binary_cat(runner):
    result = runner.invoke(app, ["explain", "--probs", "0.7", "--target", "1", "--binary"])
    assert result.exit_code == 0, result.output
    assert f"loss = the term = {f6(math.log2(1 / 0.7))} bits" in result.stdout
    assert f6(0.7 - 1) in result.stdout  # sigmoid(x) - t with x = logit(0.7)


def test_multilabel_is_a_sum_of_binary_terms(runner):
    x, t = [1.2, -0.3, 2.0], [1.0, 0.0, 1.0]
    args = ["explain", "--logits", "1.2,-0.3,2.0", "--target", "1,0,1", "--multilabel"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    sig = [1 / (1 + math.exp(-v)) for v in x]
    pairs = zip(t, sig, strict=True)
    terms = [-(ti * math.log2(s) + (1 - ti) * math.log2(1 - s)) for ti, s in pairs]
    for value in [*sig, *terms, *(s - ti for s, ti in zip(sig, t, strict=True))]:
        assert f6(value) in result.stdout
    assert f"loss = sum of the terms = {f6(sum(terms))} bits" in result.stdout


def test_hartleys(runner):
    result = runner.invoke(app, ["explain", "--probs", "0.5,0.5", "--target", "1",
                                 "--base", "10"])
    assert result.exit_code == 0
    assert f"{f6(math.log10(2))} hartleys" in result.stdout


def test_binary_from_a_logit(runner):
    result = runner.invoke(app, ["explain", "--logits", "0.3", "--target", "0", "--binary"])
    assert result.exit_code == 0, result.output
    q = 1 / (1 + math.exp(-0.3))
    assert f6(q) in result.stdout
    assert f"loss = the term = {f6(-math.log2(1 - q))} bits" in result.stdout


def test_binary_probability_zero_is_clamped_like_the_loss(runner):
    result = runner.invoke(app, ["explain", "--probs", "0", "--target", "1", "--binary"])
    assert result.exit_code == 0, result.output
    clamped = 100 / math.log(2)  # log clamped at -100 nats, as PyTorch's BCE
    assert f"loss = the term = {f6(clamped)} bits ({f6(100.0)} nats)" in result.stdout
    assert "inf" not in result.stdout


def test_ten_thousand_classes_in_bounded_memory_and_time(runner):
    """No C x C identity (10,000 classes: 800 MB): under 50 MB of new arrays for the numbers;
    every row printed, quickly (a rich table took half a minute)."""
    import time
    import tracemalloc

    from crossent.cli import explain

    probs = [1e-4] * 10_000
    tracemalloc.start()
    try:
        explain.compute(probs=probs, logits=None, target=3, label_smoothing=0.0, base=2.0,
                        binary=False, multilabel=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, f"{peak / 2**20:.0f} MiB"
    start = time.perf_counter()
    result = runner.invoke(app, ["explain", "--probs", ",".join(map(str, probs)),
                                 "--target", "3"])
    assert time.perf_counter() - start < 10
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.split()[:1] == ["9999"]]
    assert len(rows) == 1
    assert f"loss = sum of the terms = {f6(math.log2(1e4))} bits" in result.stdout
