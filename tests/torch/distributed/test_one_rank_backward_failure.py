"""A backward of ``vocab_parallel_linear_cross_entropy`` that fails on ONE rank (an input
changed in place there only) while its peers make the
backward's all-reduce of the input gradient. The failing rank raised before that
collective and its peers waited in it until the collective timeout (the brief: nothing
hangs; torch's own composition, whose input-gradient all-reduce runs after the matmul's
backward, would wait so too). Now the failing rank joins the all-reduce with a NaN input
gradient and then raises: its peers return at once, their input gradient NaN (not one
silently lacking the failing rank's part), their weight gradient torch's. A backward
through gradients an earlier backward consumed joins nothing (no peer makes it), nor does
the refusal of a batched ``grad_output`` (local: ``test_distributed_batched_refusal.py``).

One launch of 2 and one of 3 gloo ranks; each probe runs on a fresh subgroup whose
collectives time out after ``_HANG_S`` seconds and is timed, so a wait shows as a gloo
timeout or as a slow probe. References: torch's ``F.linear`` + ``F.cross_entropy`` in float64
on the whole vocabulary."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from dist_harness import gather_probes, run_group

from crossent.torch.distributed import vocab_parallel_linear_cross_entropy

pytestmark = pytest.mark.timeout(150)

N, VR, D = 5, 3, 4  # rows, classes per rank, features
_HANG_S = 5


def _data(world):
    g = torch.Generator().manual_seed(36)  # the same on every rank
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(VR * world, D, generator=g, dtype=torch.float64)
    cw = torch.rand(VR * world, generator=g, dtype=torch.float64) + 0.5
    t = torch.randint(0, VR * world, (N,), generator=g)
    t[3] = -100
    return x, w, cw, t


def _reference(x, w, cw, t, reduction):
    """torch in float64: (dX, dW) of the summed (or reduced) loss on the whole vocabulary."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = F.cross_entropy(F.linear(x, w), t, weight=cw, reduction=reduction)
    loss.sum().backward()
    return x.grad, w.grad


def _change(what, x, w, cw, t, n):
    with torch.no_grad():
        {"input": lambda: x.mul_(2), "linear_weight": lambda: w.add_(1),
         "target": lambda: t.fill_(0), "weight": lambda: cw.mul_(3),
         "num_items": lambda: n.add_(1)}[what]()


def _probe(case):
    """Every rank: forward, then (rank 0 only) the case's change, then backward; returns
    whether the input gradient is all NaN and which gradients are torch's."""
    kind, reduction = case.split("/")

    def probe(rank, world, group):
        x0, w0, cw0, t0 = _data(world)
        lo = VR * rank
        x = x0.clone().requires_grad_()
        w = w0[lo:lo + VR].clone().requires_grad_()
        cw, t = cw0[lo:lo + VR].clone(), t0.clone()
        n = torch.tensor(4.0, dtype=torch.float64)
        count = {"num_items": n} if kind == "num_items" else {}
        outer = vocab_parallel_linear_cross_entropy(x, w, t, weight=cw, group=group,
                                                    reduction=reduction, **count).sum()
        if rank == 0 and kind not in ("none", "twice"):
            _change(kind, x, w, cw, t, n)
        outer.backward(retain_graph=kind == "twice")
        if kind == "twice" and rank == 0:  # a second backward on rank 0 alone
            outer.backward()
        want_x, want_w = _reference(x0, w0, cw0, t0, reduction)
        if kind == "num_items":  # sum / n
            want_x, want_w = want_x / 4, want_w / 4
        return {"x_all_nan": bool(x.grad.isnan().all()),
                "x_is_torchs": bool(torch.allclose(x.grad, want_x, rtol=1e-10, atol=1e-12)),
                "w_is_torchs": bool(torch.allclose(w.grad, want_w[lo:lo + VR], rtol=1e-10,
                                                   atol=1e-12))}

    return probe


_CASES = ["none/mean", "input/mean", "linear_weight/mean", "target/mean", "weight/mean",
          "num_items/sum", "input/none", "linear_weight/sum", "twice/mean"]


def _run_probes(rank, world, path):
    gather_probes(rank, world, path, {case: _probe(case) for case in _CASES}, _HANG_S)


@pytest.fixture(scope="module", params=[2, 3])
def outcomes(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("one_rank") / "outcomes.json"
    run_group(_run_probes, request.param, str(path), timeout=120)
    return json.loads(path.read_text())


def test_no_change_is_torchs_on_every_rank(outcomes):
    for result, grads, _ in outcomes["none/mean"]:
        assert result == "returned" and grads["x_is_torchs"] and grads["w_is_torchs"], grads


@pytest.mark.parametrize("case", ["input/mean", "linear_weight/mean", "target/mean",
                                  "weight/mean", "num_items/sum", "input/none",
                                  "linear_weight/sum"])
def test_an_input_changed_on_one_rank_raises_there_and_no_peer_waits(outcomes, case):
    seen = outcomes[case]
    result, _, seconds = seen[0]
    assert result.startswith("RuntimeError: crossent"), result
    assert "modified in place" in result or "modified by an inplace" in result, result
    assert seconds < _HANG_S * 0.6, seen
    for result, grads, seconds in seen[1:]:
        assert result == "returned", seen
        assert seconds < _HANG_S * 0.6, seen
        assert grads["x_all_nan"] and grads["w_is_torchs"], seen


def test_a_second_backward_on_one_rank_raises_at_once_and_joins_nothing(outcomes):
    """Rank 0 alone back-propagates again through consumed gradients: it raises at once
    (had it joined the all-reduce, no peer would have come: a wait until the timeout);
    every rank's first backward gave torch's gradients."""
    seen = outcomes["twice/mean"]
    assert seen[0][0].startswith("RuntimeError") and "backward ran twice" in seen[0][0], seen
    assert seen[0][2] < _HANG_S * 0.6, seen
    assert all(result == "returned" for result, _, _ in seen[1:]), seen
    assert all(grads["x_is_torchs"] and grads["w_is_torchs"] for _, grads, _ in seen[1:])
