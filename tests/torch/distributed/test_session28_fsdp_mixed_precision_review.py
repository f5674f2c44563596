"""Review H99 (session 28): crossent.torch's linear head under FSDP2 mixed precision.

``fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
reduce_dtype=torch.float32))`` on 2 gloo CPU ranks: FSDP casts the all-gathered parameters to
bfloat16 for forward/backward and reduce-scatters the gradients in float32. A tiny model
(Embedding -> Linear -> tanh -> head) whose head is crossent's ``linear_cross_entropy``
(``backend="rowblock"`` and the default), or ``cross_entropy`` on ``F.linear`` logits, must give
torch's ``F.cross_entropy(F.linear(...))`` under the same policy: the loss's dtype and value,
every parameter gradient (``full_tensor()``, float32 sharded parameters) to bfloat16 tolerance
(both round the head's logits and gradients to bfloat16), on both ranks, with no false error
and no hang. References are torch's computations under the same wrapping, never crossent's.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from dist_harness import gather_results, run_and_load
from torch import nn

import crossent.torch as xt

pytestmark = pytest.mark.timeout(120)

VOCAB, DIM, HIDDEN, ROWS = 40, 8, 16, 12
# bfloat16 forward/backward: both sides round logits and gradients to bfloat16 (8 bits)
LOSS_TOL = dict(rtol=1e-2, atol=0.0)  # about 2 bfloat16 ulps (one was seen, smoothing)
GRAD_RTOL = 1.5e-2  # relative to each gradient's norm (seen: 4e-3 to 6e-3)


class _Head(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.linear = nn.Linear(HIDDEN, VOCAB, bias=True)
        self.kind = kind

    def forward(self, h, y):
        w, b, kind = self.linear.weight, self.linear.bias, self.kind
        if kind == "torch":
            return F.cross_entropy(F.linear(h, w, b), y)
        if kind == "torch_smooth":
            return F.cross_entropy(F.linear(h, w, b), y, label_smoothing=0.1)
        if kind == "lce_rowblock":
            return xt.linear_cross_entropy(h, w, y, b, ignore_index=-100, backend="rowblock")
        if kind == "lce_rowblock_smooth":
            return xt.linear_cross_entropy(h, w, y, b, ignore_index=-100, backend="rowblock",
                                           label_smoothing=0.1, chunk_size=5)
        if kind == "lce_auto":
            return xt.linear_cross_entropy(h, w, y, b, ignore_index=-100)
        if kind == "ce_rowblock":
            return xt.cross_entropy(F.linear(h, w, b), y, backend="rowblock")
        raise AssertionError(kind)


class _Net(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.body = nn.Linear(DIM, HIDDEN)
        self.head = _Head(kind)

    def forward(self, tok, y):
        return self.head(torch.tanh(self.body(self.emb(tok))), y)


def _build(kind, wrap, mesh):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    net = _Net(kind)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if wrap == "per_layer":
        fully_shard(net.body, mesh=mesh, mp_policy=policy)
        fully_shard(net.head, mesh=mesh, mp_policy=policy)
    fully_shard(net, mesh=mesh, mp_policy=policy)
    return net


def _batch(rank, step):
    g = torch.Generator().manual_seed(200 + 10 * rank + step)
    tok = torch.randint(0, VOCAB, (ROWS,), generator=g)
    y = torch.randint(0, VOCAB, (ROWS,), generator=g)
    y[rank::5] = -100
    return tok, y


def _run_case(rank, mesh, ref_kind, kind, wrap, steps=2) -> str:
    nets = [_build(k, wrap, mesh) for k in (ref_kind, kind)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.5) for n in nets]
    for step in range(steps):
        tok, y = _batch(rank, step)
        results = []
        for net, opt in zip(nets, opts, strict=True):
            opt.zero_grad()
            loss = net(tok, y)
            loss.backward()
            grads = {name: p.grad.full_tensor().clone() for name, p in net.named_parameters()}
            results.append((loss.detach().clone(), grads))
            opt.step()
        (l_ref, g_ref), (l_x, g_x) = results
        if l_x.dtype != l_ref.dtype:
            return f"step {step}: loss dtype {l_x.dtype} vs torch {l_ref.dtype}"
        if not torch.allclose(l_x.float(), l_ref.float(), **LOSS_TOL):
            return f"step {step}: loss {l_x.item()} vs torch {l_ref.item()}"
        for name, g in g_ref.items():
            gx = g_x[name]
            if gx.dtype != g.dtype:
                return f"step {step}: grad {name} dtype {gx.dtype} vs torch {g.dtype}"
            if not torch.isfinite(gx).all():
                return f"step {step}: grad {name} not finite"
            err = ((gx - g).norm() / g.norm()).item()
            if err > GRAD_RTOL:
                return f"step {step}: grad {name} differs (relative error {err:.3g})"
    return "ok"


CASES = [
    # (torch reference head, crossent head, wrapping)
    ("torch", "lce_rowblock", "per_layer"),
    ("torch", "lce_auto", "per_layer"),
    ("torch", "lce_rowblock", "whole"),
    ("torch", "lce_auto", "whole"),
    ("torch", "ce_rowblock", "per_layer"),
    ("torch_smooth", "lce_rowblock_smooth", "per_layer"),
]


def _worker(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    gather_results(rank, world, path, {
        "/".join(case): functools.partial(_run_case, rank, mesh, *case) for case in CASES})


@pytest.fixture(scope="module")
def fsdp_mp_results(tmp_path_factory):
    return run_and_load(_worker, 2, tmp_path_factory.mktemp("fsdp_mp"))


@pytest.mark.parametrize("case", ["/".join(c) for c in CASES])
def test_fsdp2_bfloat16_mixed_precision_head_is_torchs(fsdp_mp_results, case):
    assert fsdp_mp_results[case] == ["ok", "ok"]
