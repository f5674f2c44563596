"""The launch variants of the fused cross-entropy kernel against torch in float64.

``ce_kernel`` has two launch switches (see :mod:`crossent.torch._triton.kernels`):
``REVERSE`` (pass 2 walks the tiles last to first) and a persistent grid (a fixed number
of programs, each striding over the rows). Every variant must give torch's values and
gradients with every option. Shapes: 9 rows of 300 classes in tiles of 128 (two full tiles
and a ragged 44; one test 256 classes, whole tiles only). The persistent grids have 1
program (all 9 rows), 4 programs (9 = 3 + 2 + 2 + 2: several rows per program, a ragged
last round) and 20 programs (more than rows: 11 programs idle) on any device: the
override's programs per SM is that count over the device's SM count (``ops.sm_count``; a
stand-in 4 off CUDA), which ``test_launch_config_resolves`` pins down. Options are
combined rather than multiplied out: the interpreter costs milliseconds per tile
operation.
"""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import launch_variants  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from grad_probes import close_to_reference as close  # noqa: E402
from launch_variants import launched_as, variants  # noqa: E402

from crossent.torch._triton import ops, triton_cross_entropy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreter
# 9 rows keep what the variants need (was 13 = 4 + 3 + 3 + 3 on 4 programs, at 13/9 of the
# interpreter's cost): several rows per persistent program, a ragged last round, more
# programs than rows at 20, and two ignored rows (0 and 5, on programs 0 and 1)
N, V, BLOCK = 9, 300, 128
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (reverse, persistent programs): 0 is one program per row (grid N), today's default launch
GRIDS = (0, 1, 4, 20)
VARIANTS, IDS = variants(GRIDS)


def programs_per_sm(programs: int) -> float:
    return launch_variants.programs_per_sm(programs, DEVICE)


@pytest.fixture(params=VARIANTS, ids=IDS)
def variant(request):
    """Every ce_kernel launch inside the test uses this variant; the override is put back
    afterwards (asserted: a leaked override would change every later test's launch)."""
    with launched_as(*request.param, DEVICE):
        yield request.param


def reference_rows(z, target, weight=None, eps=0.0, z_loss=0.0, softcap=None):
    """torch in float64 (independent of crossent): the float64 leaf, the row losses of
    F.cross_entropy on the softcapped logits plus ``z_loss * lse^2`` on counted rows
    (ignored rows 0), and torch's "mean" denominator."""
    zd = z.detach().double().requires_grad_()
    zc = softcap * torch.tanh(zd / softcap) if softcap is not None else zd
    w = None if weight is None else weight.double()
    prob = target.is_floating_point()
    rows = F.cross_entropy(zc, target.double() if prob else target, weight=w,
                           reduction="none", label_smoothing=eps)
    if prob:
        counted = torch.ones(z.shape[0], dtype=torch.float64, device=z.device)
        denom = counted.sum()
    else:
        counted = (target != -100).double()
        safe = torch.where(target != -100, target, 0)
        denom = (counted if w is None else w[safe] * counted).sum()
    return zd, rows + z_loss * torch.logsumexp(zc, 1).square() * counted, denom


def make(dtype=torch.float32, prob=False, seed=0, v=V):
    """Logits (scale 3), targets (index targets: rows 0 and 5 ignored) and class weights
    (float64 for float64 logits, float32 otherwise: what torch accepts, as under autocast)."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, v, generator=g, dtype=torch.float64) * 3).to(dtype)
    if prob:
        target = torch.rand(N, v, generator=g, dtype=torch.float64)
        target[:, ::7] = 0.0  # zero targets: their terms must be exactly 0
        target = (target / target.sum(1, keepdim=True)).to(dtype)
    else:
        target = torch.randint(0, v, (N,), generator=g)
        target[::5] = -100
    weight = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
    if dtype != torch.float64:
        weight = weight.float()
    return z.to(DEVICE), target.to(DEVICE), weight.to(DEVICE)


ALL = dict(label_smoothing=0.1, z_loss=1e-3, softcap=30.0)


def test_launch_config_resolves():
    """Defaults are today's launch (BLOCK 8192 with 16 warps at 128k classes, forward
    order, one program per row); an override replaces only the fields it sets, an
    explicit block wins over it, and the previous override comes back even on an error."""
    dev = torch.device(DEVICE)
    assert ops.ce_launch_override is None
    assert ops.ce_launch_config(128256, 2, dev) == ops.CeLaunch(8192, 16, False, 0)
    assert ops.ce_launch_config(128256, 8, dev) == ops.CeLaunch(4096, 8, False, 0)
    assert ops.ce_launch_config(V, 4, dev, BLOCK) == ops.CeLaunch(BLOCK, 4, False, 0)
    sms = ops.sm_count(dev)
    with ops.override_ce_launch(block=32768, warps=32, reverse=True, programs_per_sm=2):
        assert ops.ce_launch_config(128256, 2, dev) == ops.CeLaunch(32768, 32, True, 2 * sms)
        assert ops.ce_launch_config(V, 4, dev, BLOCK) == ops.CeLaunch(BLOCK, 32, True, 2 * sms)
        with ops.override_ce_launch(block=16384):  # nested: only the tile (16 warps)
            assert ops.ce_launch_config(128256, 2, dev) == ops.CeLaunch(16384, 16, False, 0)
        assert ops.ce_launch_override.block == 32768
    with pytest.raises(RuntimeError), ops.override_ce_launch(reverse=True):
        raise RuntimeError
    assert ops.ce_launch_override is None
    for programs in GRIDS:  # this file's grids: N, 1, 4 (ragged), more than N
        with ops.override_ce_launch(programs_per_sm=programs_per_sm(programs)):
            assert ops.ce_launch_config(V, 4, dev, BLOCK).programs == programs
    assert N % GRIDS[2] != 0 and GRIDS[3] > N


def test_index_targets_every_option(variant):
    """Weights, smoothing, z-loss, softcap and ignored rows at once, "mean": loss and the
    gradient (ignored rows exactly 0) against torch."""
    z, target, w = make(seed=1)
    leaf = z.clone().requires_grad_()
    loss = triton_cross_entropy(leaf, target, w, block=BLOCK, **ALL)
    loss.backward()
    zd, rows, denom = reference_rows(z, target, w, eps=0.1, z_loss=1e-3, softcap=30.0)
    want = rows.sum() / denom
    want.backward()
    close(loss, want, TOL[torch.float32])
    close(leaf.grad, zd.grad, TOL[torch.float32])
    assert float(leaf.grad[::5].abs().max()) == 0.0


def test_probability_targets_float64(variant):
    """Probability targets (zero entries) with weights, smoothing, z-loss and softcap in
    float64 (the kernel then accumulates in float64), "sum"."""
    z, target, w = make(torch.float64, prob=True, seed=2)
    leaf = z.clone().requires_grad_()
    loss = triton_cross_entropy(leaf, target, w, reduction="sum", block=BLOCK, **ALL)
    loss.backward()
    zd, rows, _ = reference_rows(z, target, w, eps=0.1, z_loss=1e-3, softcap=30.0)
    rows.sum().backward()
    close(loss, rows.sum(), TOL[torch.float64])
    close(leaf.grad, zd.grad, TOL[torch.float64])


def test_row_multiplier_and_scale_into_a_separate_buffer(variant):
    """The kernel's own entry: per-row multiplier (the grad_output of "none") times a
    device scale, gradient into a NaN-filled buffer (every entry written, ignored rows
    zeros), logits untouched; row losses and lse against torch in float64. 256 classes:
    two whole tiles, no ragged one (where the reverse walk starts)."""
    z, target, w = make(torch.float64, seed=3, v=2 * BLOCK)
    mult = torch.rand(N, dtype=torch.float64, device=DEVICE) + 0.5
    scale = torch.tensor(0.75, dtype=torch.float64, device=DEVICE)
    out = torch.full_like(z, float("nan"))
    before = z.clone()
    res = ops.cross_entropy_forward(z, target, weight=w, reduction="none", grad_out=out,
                                    row_multiplier=mult, scale=scale, block=BLOCK,
                                    label_smoothing=0.1, z_loss=1e-2)
    assert torch.equal(z, before) and res.grad is out
    zd, rows, _ = reference_rows(z, target, w, eps=0.1, z_loss=1e-2)
    (rows * mult * 0.75).sum().backward()
    close(res.loss, rows, TOL[torch.float64])
    counted = target != -100
    close(res.lse[counted], torch.logsumexp(z[counted].double(), 1), TOL[torch.float64])
    assert float(res.lse[~counted].abs().max()) == 0.0
    close(out, zd.grad, TOL[torch.float64])
    assert float(out[::5].abs().max()) == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_in_place(variant, dtype):
    """bf16 / fp16 logits with the gradient written over them (each tile read before the
    same program overwrites it, in either order), every option, "none" with a random
    grad_output."""
    z, target, w = make(dtype, seed=4 if dtype == torch.bfloat16 else 5)
    leaf = z.clone().requires_grad_()
    rows = triton_cross_entropy(leaf, target, w, reduction="none",
                                inplace_backward=True, block=BLOCK, **ALL)
    go = torch.rand(N, dtype=torch.float64, device=DEVICE) + 0.5
    rows.backward(go.to(rows.dtype))
    zd, want, _ = reference_rows(z, target, w, eps=0.1, z_loss=1e-3, softcap=30.0)
    want.backward(go.to(rows.dtype).double())
    close(rows, want, TOL[dtype])
    close(leaf.grad, zd.grad, TOL[dtype])


def test_forward_only(variant):
    """GRAD off: with smoothing pass 2 still runs (its loss terms), without it pass 1
    alone; the gradient buffer argument is then never written."""
    z, target, w = make(seed=6)
    before = z.clone()
    for eps in (0.1, 0.0):
        res = ops.cross_entropy_forward(z, target, weight=w, reduction="none",
                                        compute_grad=False, block=BLOCK,
                                        label_smoothing=eps, softcap=30.0)
        assert res.grad is None and torch.equal(z, before)
        _, rows, _ = reference_rows(z, target, w, eps=eps, softcap=30.0)
        close(res.loss, rows, TOL[torch.float32])


# --------------------------------------------------- the variants compiled for sm_90


def test_persistent_row_loop_is_64_bit(sm90_compile):
    """Compiled for sm_90 (compile_for_gpu.py's "rowloop" group, run in a fresh process by
    conftest's ``sm90_compile``: this one holds the interpreter), the persistent kernel's
    row loop runs in int64, so ``row * stride`` cannot wrap past 2^31 logits (the
    interpreter computes in Python ints and would never show it)."""
    assert "ok rowloop" in sm90_compile, sm90_compile
    ttir = sm90_compile.split("BEGIN rowloop", 1)[1].split("END rowloop", 1)[0]
    loops = re.findall(r"scf\.for %row\S* = .*", ttir)
    assert loops and all(line.rstrip(" {").endswith(": i64") for line in loops), loops
