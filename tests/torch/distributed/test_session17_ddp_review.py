"""Trust round (H43, session 17): ``torch.nn.parallel.DistributedDataParallel`` on 2 gloo CPU
ranks training a tiny model with crossent's losses, against the same DDP model trained with
``torch.nn.functional.cross_entropy`` (on ``F.linear`` for the linear head).

One process group (spawned children under a deadline: a hang fails the test) runs every case:
``crossent.torch.CrossEntropyLoss`` on an ``nn.Linear``'s logits and
``crossent.torch.LinearCrossEntropyLoss`` (and the functions), ``backend="auto"`` (torch's
dispatch: small inputs go to torch's kernel) and ``"rowblock"`` (crossent's fused kernels),
buffer reuse on and off, ``gradient_as_bucket_view``, ``find_unused_parameters`` and
``inplace_backward`` on and off; two SGD steps, every
parameter's gradient after each step against torch's DDP run; then ``no_sync()`` gradient
accumulation over three micro-batches of uneven token counts with ``num_items`` from
``crossent.torch.distributed.global_num_items`` against the single-process full batch in
float64. References never come from crossent's output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist_harness import run_group
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import crossent.torch as xt
from crossent.torch.distributed import global_num_items

pytestmark = pytest.mark.timeout(150)

DIM, HIDDEN, VOCAB, ROWS = 6, 8, 11, 10


class _Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(DIM, HIDDEN)

    def hidden(self, x):
        return torch.tanh(self.body(x))


class _LogitsNet(_Body):
    """Body, an ``nn.Linear`` head and a loss module on its logits."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.head, self.loss = nn.Linear(HIDDEN, VOCAB), loss

    def forward(self, x, y, num_items=None):
        logits = self.head(self.hidden(x))
        if num_items is None:
            return self.loss(logits, y)
        return self.loss(logits, y, num_items=num_items)


class _TorchLogitsNet(_Body):
    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.head, self.reduction = nn.Linear(HIDDEN, VOCAB), reduction

    def forward(self, x, y, num_items=None):
        out = F.cross_entropy(self.head(self.hidden(x)), y, reduction=self.reduction,
                              label_smoothing=0.1)
        return out if num_items is None else out / num_items


class _HeadNet(_Body):
    """Body and crossent's ``LinearCrossEntropyLoss`` (its ``linear`` is the head)."""

    def __init__(self, backend: str, reduction: str = "mean") -> None:
        super().__init__()
        self.head = xt.LinearCrossEntropyLoss(HIDDEN, VOCAB, bias=True, backend=backend,
                                              reduction=reduction, label_smoothing=0.1)

    def forward(self, x, y, num_items=None):
        h = self.hidden(x)
        return self.head(h, y) if num_items is None else self.head(h, y, num_items=num_items)


class _TorchHeadNet(_Body):
    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.head = nn.Module()
        self.head.linear = nn.Linear(HIDDEN, VOCAB)
        self.reduction = reduction

    def forward(self, x, y, num_items=None):
        logits = F.linear(self.hidden(x), self.head.linear.weight, self.head.linear.bias)
        out = F.cross_entropy(logits, y, reduction=self.reduction, label_smoothing=0.1)
        return out if num_items is None else out / num_items


def _pair(kind: str, backend: str, reduction: str = "mean", inplace: bool = False):
    """(crossent model, torch model) with the same parameters (seeded, same on every rank)."""
    torch.manual_seed(0)
    if kind == "logits":
        ours: nn.Module = _LogitsNet(xt.CrossEntropyLoss(backend=backend, reduction=reduction,
                                                         label_smoothing=0.1,
                                                         inplace_backward=inplace))
        theirs: nn.Module = _TorchLogitsNet(reduction)
    else:
        ours, theirs = _HeadNet(backend, reduction), _TorchHeadNet(reduction)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)
    return ours, theirs


def _data(seed: int, rows: int = ROWS):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, DIM, generator=g)
    y = torch.randint(0, VOCAB, (rows,), generator=g)
    y[torch.rand(rows, generator=g) < 0.3] = -100
    return x, y


def _close(a, b, what):
    torch.testing.assert_close(a.double(), b.double(), rtol=2e-5, atol=2e-6, msg=what)


def _train_two_steps(rank, world, kind, backend, variant):
    """``variant``: buffer reuse off, ``gradient_as_bucket_view``, ``inplace_backward`` and
    ``find_unused_parameters`` on (the last three with reuse on)."""
    other = variant == "others"
    ours, theirs = _pair(kind, backend, inplace=other)
    runs = []
    for model in (ours, theirs):
        ddp = DDP(model, gradient_as_bucket_view=other, find_unused_parameters=other)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        grads = []
        for step in range(2):
            x, y = _data(100 * step + rank)
            opt.zero_grad(set_to_none=step == 0)
            ddp(x, y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
        runs.append((grads, [p.detach().clone() for p in model.parameters()]))
    (g_ours, p_ours), (g_theirs, p_theirs) = runs
    for step, (a, b) in enumerate(zip(g_ours, g_theirs, strict=True)):
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _close(u, v, f"{kind} {backend} step {step} grad {i} rank {rank}")
    for i, (u, v) in enumerate(zip(p_ours, p_theirs, strict=True)):
        _close(u, v, f"{kind} {backend} param {i} rank {rank}")


def _accumulate(rank, world, kind, backend):
    """``no_sync`` over the first two of three micro-batches, each loss ``sum / n`` with
    ``n`` the whole step's count over every rank and micro-batch: the synchronised gradient
    is the full batch's mean gradient (DDP averages over ranks, hence ``* world``)."""
    ours, _ = _pair(kind, backend, reduction="sum")
    reference = (_TorchLogitsNet if kind == "logits" else _TorchHeadNet)().double()
    reference.load_state_dict(ours.state_dict(), strict=False)
    every = [_data(1000 + 10 * r + k, rows=4 + 3 * k) for r in range(world) for k in range(3)]
    mine = every[3 * rank:3 * rank + 3]
    num_items = global_num_items([y for _, y in mine])
    assert int(num_items) == sum(int((y != -100).sum()) for _, y in every)
    ddp = DDP(ours)
    for k, (x, y) in enumerate(mine):
        with ddp.no_sync() if k < 2 else torch.enable_grad():
            (ddp(x, y, num_items) * world).backward()
    x_all = torch.cat([x for x, _ in every]).double()
    y_all = torch.cat([y for _, y in every])
    reference(x_all, y_all).backward()  # reduction="mean" over the whole batch
    for i, (p, q) in enumerate(zip(ours.parameters(), reference.parameters(), strict=True)):
        _close(p.grad, q.grad, f"accumulated {kind} {backend} grad {i} rank {rank}")


def _all_cases(rank, world):
    previous = xt.set_buffer_reuse(True)
    try:
        for kind in ("logits", "head"):
            for backend in ("auto", "rowblock"):
                for variant in ("no-reuse", "others"):
                    xt.set_buffer_reuse(variant != "no-reuse")
                    _train_two_steps(rank, world, kind, backend, variant)
                _accumulate(rank, world, kind, backend)
    finally:
        xt.set_buffer_reuse(previous)


def test_ddp_training_and_no_sync_accumulation_match_torch():
    run_group(_all_cases, 2, timeout=120)
