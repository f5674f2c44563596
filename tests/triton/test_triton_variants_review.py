"""Review of ``ce_kernel``'s launch variants (H29): edge shapes, row state in a persistent
program, the launch override's scope, ``sm_count``, the interpreter's helpers, and the
constexpr paths compiled for sm_90.

Each variant is ``(REVERSE, programs)``: pass 2 forward or last tile first, and one program
per row (``0``) or a persistent grid of 1, 4 or 50 programs (50: more programs than rows).
References are torch in float64 (``F.cross_entropy`` on the softcapped logits plus the
z-loss, its autograd gradient), independent of crossent. Shapes use 16-class tiles so that
the interpreter stays fast: V = 1, V < BLOCK, V = 2 BLOCK (no ragged tile), N = 1, and
N = 9 over 4 programs (3 + 2 + 2 + 2 rows: several rows per program, a ragged last round). A
persistent program serves many rows one after the other, so the state test puts NaN rows,
-inf rows, ignored rows, out-of-range targets and rows of huge logits next to ordinary
rows in the same program and checks every ordinary row against torch.
"""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from launch_variants import launched_as, programs_per_sm, variants  # noqa: E402

from crossent.torch._triton import kernels, ops, triton_cross_entropy  # noqa: E402

pytestmark = pytest.mark.timeout(240)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreter
BLOCK = 16
F64 = torch.float64
VARIANTS, IDS = variants((0, 1, 4, 50))


def per_sm(programs: int) -> float:
    return programs_per_sm(programs, DEVICE)


@pytest.fixture(params=VARIANTS, ids=IDS)
def variant(request):
    reverse, programs = request.param
    with launched_as(reverse, programs, DEVICE):
        launch = ops.ce_launch_config(40, 8, torch.device(DEVICE), BLOCK)
        assert (launch.reverse, launch.programs) == (reverse, programs)
        yield request.param


def reference(z, target, weight=None, eps=0.0, z_loss=0.0, softcap=None, mult=None):
    """torch in float64: row losses, lse (0 on ignored rows) and d(sum_n rows_n mult_n)/dz.
    Rows whose index target is out of range are computed with target 0 here; the caller
    marks them NaN (torch raises for them)."""
    zd = z.detach().to(F64).requires_grad_()
    zc = softcap * torch.tanh(zd / softcap) if softcap is not None else zd
    w = None if weight is None else weight.to(F64)
    prob = target.is_floating_point()
    v = z.shape[1]
    if prob:
        tgt = target.to(F64)
        counted = torch.ones(z.shape[0], dtype=F64, device=z.device)
    else:
        counted = (target != -100).to(F64)
        tgt = torch.where((target >= 0) & (target < v) | (target == -100), target, 0)
    rows = F.cross_entropy(zc, tgt, weight=w, reduction="none", label_smoothing=eps)
    # lse about a detached max: its gradient is exp(z - m) / s, exact even at |z| ~ 1e300,
    # where torch.logsumexp's backward, exp(z - lse), loses log(s) to rounding
    m = zc.detach().amax(1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    lse = (m + torch.log(torch.exp(zc - m).sum(1, keepdim=True)))[:, 0]
    if z_loss:
        rows = rows + torch.where(counted != 0, z_loss * lse.square(), 0.0)
    m = torch.ones_like(rows) if mult is None else mult.to(F64)
    if z.shape[0]:
        (rows * m).sum().backward()
        grad = zd.grad
    else:
        grad = torch.zeros_like(zd)
    return rows.detach(), torch.where(counted != 0, lse, 0.0).detach(), grad


def rowwise_close(got, want, rtol=1e-10):
    """Row by row, relative to the row's largest finite reference magnitude; NaN where the
    reference is NaN, and only there. (``torch.testing.assert_close(got[i], want[i], rtol,
    atol=rtol * scale_i + 1e-300, equal_nan=True)`` for every row ``i`` at once: its
    ``torch.isclose`` test, with the atol of each row.)"""
    got, want = got.detach().to(F64).cpu(), want.detach().to(F64).cpu()
    assert got.shape == want.shape
    if got.dim() == 1:
        got, want = got[:, None], want[:, None]
    scale = torch.where(torch.isfinite(want), want.abs(), 0.0).amax(1, keepdim=True)
    scale = torch.where(torch.isfinite(want).any(1, keepdim=True), scale, 1.0)
    atol = rtol * scale + 1e-300
    both_finite = torch.isfinite(got) & torch.isfinite(want)
    ok = ((got == want) | (got.isnan() & want.isnan())
          | (both_finite & ((got - want).abs() <= atol + rtol * want.abs())))
    if not bool(ok.all()):
        i, j = (int(k) for k in (~ok).nonzero()[0])
        raise AssertionError(f"row {i}: {int((~ok[i]).sum())} of {ok.shape[1]} entries not "
                             f"close (rtol {rtol}, atol {float(atol[i]):.3g}); first at "
                             f"column {j}: got {float(got[i, j])!r}, want {float(want[i, j])!r}")


def data(n, v, seed, prob=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=F64) * 3
    if prob:
        t = torch.rand(n, v, generator=g, dtype=F64)
        t[:, ::3] = 0.0
        t = t / t.sum(1, keepdim=True).clamp_min(1e-300)
    else:
        t = torch.randint(0, v, (n,), generator=g)
        t[1::4] = -100
    w = torch.rand(v, generator=g, dtype=F64) + 0.5
    mult = torch.rand(n, generator=g, dtype=F64) + 0.5
    return z.to(DEVICE), t.to(DEVICE), w.to(DEVICE), mult.to(DEVICE)


# (N, V): V = 1, V < BLOCK, V a multiple of BLOCK, N = 1, and MANY: more rows than 4
# programs, so each program serves several rows one after the other and the last round is
# ragged (9 = 3 + 2 + 2 + 2; was 37 = 10 + 9 + 9 + 9, the same two properties at four
# times the interpreter's cost); 40 classes: two tiles of 16 and a ragged 8
MANY = (9, 40)
SHAPES = [(5, 1), (6, 7), (5, 2 * BLOCK), (1, 40), MANY]
OPTS = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)


# every shape in every variant, but the MANY rows only on 4 programs (3 + 2 + 2 + 2 rows;
# the state test runs 16 rows on 1 program). On CUDA every case compiles its own kernels
# (tests/triton has 150 s in run_device.sh): there all shapes on reverse + 4 programs only
CASES = [(var, shape) for var in VARIANTS for shape in SHAPES
         if (shape != MANY or var[1] == 4) and (DEVICE == "cpu" or var == (True, 4))]


@pytest.mark.parametrize(("launch", "shape"), CASES,
                         ids=[f"{IDS[VARIANTS.index(var)]}-{n}x{v}" for var, (n, v) in CASES])
def test_edge_shapes_every_variant(launch, shape):
    """Index targets with every option and a per-row multiplier (gradient into a NaN-filled
    buffer: every entry written), then GRAD off (with smoothing: pass 2 for the loss terms
    only), then probability targets with softcap + smoothing, GRAD off (and on, for the MANY
    rows); float64 logits (float64 accumulation) against torch, logits untouched."""
    with ops.override_ce_launch(reverse=launch[0], programs_per_sm=per_sm(launch[1])):
        _edge_shape(*shape)
    assert ops.ce_launch_override is None


def _edge_shape(n, v):
    z, t, w, mult = data(n, v, seed=n * 100 + v)
    before = z.clone()
    scale = torch.tensor(0.5, dtype=F64, device=DEVICE)
    out = torch.full_like(z, float("nan"))
    res = ops.cross_entropy_forward(z, t, weight=w, reduction="none", grad_out=out,
                                    row_multiplier=mult, scale=scale, block=BLOCK, **OPTS)
    rows, lse, grad = reference(z, t, w, eps=0.1, z_loss=1e-3, softcap=5.0, mult=mult * 0.5)
    rowwise_close(res.loss, rows)
    rowwise_close(res.lse, lse)
    rowwise_close(out, grad)
    assert float(out[t == -100].abs().sum()) == 0.0

    res = ops.cross_entropy_forward(z, t, weight=w, reduction="none", compute_grad=False,
                                    block=BLOCK, label_smoothing=0.2)
    assert res.grad is None
    rows, lse, _ = reference(z, t, w, eps=0.2)
    rowwise_close(res.loss, rows)
    rowwise_close(res.lse, lse)

    _, tp, _, _ = data(n, v, seed=n * 100 + v + 1, prob=True)
    rows, lse, grad = reference(z, tp, w, eps=0.1, softcap=5.0)
    # with GRAD the variants' own tests cover probabilities at 9 x 300; here the many rows
    for compute_grad in (False, True) if (n, v) == MANY else (False,):
        out = torch.full_like(z, float("nan"))
        res = ops.cross_entropy_forward(z, tp, weight=w, reduction="sum", block=BLOCK,
                                        compute_grad=compute_grad, grad_out=out,
                                        label_smoothing=0.1, softcap=5.0)
        rowwise_close(res.loss, rows)
        rowwise_close(res.lse, lse)
        if compute_grad:
            rowwise_close(out, grad)
        else:
            assert res.grad is None and bool(out.isnan().all())  # never written
    assert torch.equal(z, before)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("programs", [1, 4])
def test_persistent_rows_carry_no_state(reverse, programs):
    """A persistent program serves rows p, p + P, ...: after a NaN row, an ignored row, an
    out-of-range target (above V and negative), a row of -inf, a row of +-1e300 logits and
    a row whose multiplier is 0 or negative, the next rows of the same program are torch's
    (targets all different), and each special row gets torch's values (NaN for the bad
    targets, as the kernel documents, neighbours intact). Through triton_cross_entropy with
    check_targets=False and a random grad_output per row ("none")."""
    n, v = 16, 40
    z, _, w, _ = data(n, v, seed=7)
    t = torch.arange(n, device=DEVICE) * 2 + 1  # a different class in every row
    z[0] = float("nan")          # program 0 with 4 programs, row 0 with 1
    t[1] = -100                  # program 1
    t[2] = v                     # program 2: out of range above
    z[3] = float("-inf")         # program 3
    t[8] = -3                    # program 0 again: out of range below, not ignore_index
    z[9] = z[9].sign() * 1e300   # program 1: a huge running max, then rows of ~3
    z[10, 5] = float("nan")      # program 2: one NaN logit
    z[11, :] = -1e300            # program 3: a row of huge negative logits
    go = torch.rand(n, dtype=F64, device=DEVICE) + 0.5
    go[6], go[13] = 0.0, -2.0
    with ops.override_ce_launch(reverse=reverse, programs_per_sm=per_sm(programs)):
        leaf = z.clone().requires_grad_()
        rows = triton_cross_entropy(leaf, t, w, reduction="none", check_targets=False,
                                    block=BLOCK, label_smoothing=0.05, z_loss=1e-4)
        rows.backward(go)
    want, _, grad = reference(z, t, w, eps=0.05, z_loss=1e-4, mult=go)
    bad = (t == v) | (t == -3)
    want[bad] = float("nan")
    grad[bad] = float("nan")
    rowwise_close(rows, want)
    rowwise_close(leaf.grad, grad)
    assert float(leaf.grad[1].abs().sum()) == 0.0 and float(rows[1]) == 0.0
    assert float(leaf.grad[6].abs().sum()) == 0.0  # grad_output 0 on an ordinary row
    ordinary = [i for i in range(n) if i not in (0, 1, 2, 3, 8, 9, 10, 11)]
    assert bool(torch.isfinite(rows[ordinary]).all())
    assert bool(torch.isfinite(leaf.grad[ordinary]).all())


def test_all_rows_ignored_and_empty_batch(variant):
    """Every row ignored: torch's NaN mean, 0 sum, zero gradients; N = 0: torch's NaN mean
    and 0 sum, an empty gradient (no launch at all)."""
    z, _, w, _ = data(9, 20, seed=11)
    t = torch.full((9,), -100, device=DEVICE)
    for n in (9, 0):
        for reduction in ("mean", "sum", "none"):
            leaf = z[:n].clone().requires_grad_()
            ref = z[:n].clone().requires_grad_()
            got = triton_cross_entropy(leaf, t[:n], w, reduction=reduction, block=BLOCK,
                                       label_smoothing=0.1)
            want = F.cross_entropy(ref, t[:n], w, reduction=reduction, label_smoothing=0.1)
            got.sum().backward()
            want.sum().backward()
            torch.testing.assert_close(got, want, equal_nan=True)
            torch.testing.assert_close(leaf.grad, ref.grad, equal_nan=True)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_low_precision_persistent_in_place(reverse):
    """bf16 logits with the gradient written over them by a persistent grid of 4 programs
    (9 rows: 3 + 2 + 2 + 2; several rows per program and a ragged last round, as the 37
    rows of 10 + 9 + 9 + 9 this test had), every option: each row's tiles read before the
    same program overwrites them, whatever the order."""
    n, v = MANY
    z, t, w, _ = data(n, v, seed=13)
    zb = z.to(torch.bfloat16)
    go = torch.rand(n, dtype=F64, device=DEVICE) + 0.5
    with ops.override_ce_launch(reverse=reverse, programs_per_sm=per_sm(4)):
        leaf = zb.clone().requires_grad_()
        act = leaf.clone()  # an activation: overwritten
        rows = triton_cross_entropy(act, t, w.float(), reduction="none", block=BLOCK,
                                    inplace_backward=True, **OPTS)
        rows.backward(go.to(rows.dtype))
    want, _, grad = reference(zb, t, w.float(), eps=0.1, z_loss=1e-3, softcap=5.0,
                              mult=go.to(torch.bfloat16))
    torch.testing.assert_close(rows.double(), want, rtol=2e-2, atol=2e-2)
    top = float(grad.abs().max())
    torch.testing.assert_close(leaf.grad.double(), grad, rtol=0, atol=2e-2 * top)
    assert torch.equal(act.detach(), leaf.grad)  # the gradient is in act's memory


# ------------------------------------------------------------------ the override, sm_count


def test_override_nesting_and_restoration():
    """Nested overrides: each field the innermost sets, the rest defaults (not inherited);
    an exception at any depth puts the previous override back."""
    dev = torch.device(DEVICE)
    assert ops.ce_launch_override is None
    with pytest.raises(KeyError):
        with ops.override_ce_launch(reverse=True) as outer:
            with pytest.raises(ValueError):
                with ops.override_ce_launch(programs_per_sm=per_sm(4)):
                    assert ops.ce_launch_config(40, 8, dev, BLOCK) == ops.CeLaunch(
                        BLOCK, ops.kernel_config(40, 8, BLOCK)[1], False, 4)
                    raise ValueError
            assert ops.ce_launch_override is outer
            raise KeyError
    assert ops.ce_launch_override is None
    # values at the edges: a tiny positive per-SM count still gives one program; zero,
    # negative and NaN give one program per row
    with ops.override_ce_launch(programs_per_sm=1e-9):
        assert ops.ce_launch_config(40, 8, dev).programs == 1
    for value in (0, -1.0, float("nan")):
        with ops.override_ce_launch(programs_per_sm=value):
            assert ops.ce_launch_config(40, 8, dev).programs == 0


def test_override_is_process_wide():
    """Documented (``override_ce_launch``: "Process-wide (not per thread)"): an override
    set in one thread is what another thread's launch sees."""
    seen = []
    with ops.override_ce_launch(reverse=True, programs_per_sm=per_sm(4)):
        th = threading.Thread(target=lambda: seen.append(
            ops.ce_launch_config(40, 8, torch.device(DEVICE), BLOCK)))
        th.start()
        th.join(30)
    assert seen and seen[0].reverse and seen[0].programs == 4
    assert ops.ce_launch_override is None


def test_override_interleaved_threads_leave_nothing_behind():
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with ops.override_ce_launch(reverse=True):
            a_in.set()
            b_in.wait(30)
        a_out.set()

    def b():
        a_in.wait(30)
        with ops.override_ce_launch(programs_per_sm=2.0):
            b_in.set()
            a_out.wait(30)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    leaked = ops.ce_launch_override
    ops.ce_launch_override = None  # never leak into the other tests
    assert leaked is None, f"left behind: {leaked}"


def test_sm_count_per_cuda_index(monkeypatch):
    """cuda:N asks device N's properties (once, then cached); bare "cuda" the current
    device; both without touching a real GPU (properties stubbed)."""
    asked = []

    class Props:
        def __init__(self, index):
            self.multi_processor_count = 100 + index

    def props(index):
        asked.append(index)
        return Props(index)

    monkeypatch.setattr(ops, "_sm_counts", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert ops.sm_count(torch.device("cuda", 1)) == 101
    assert ops.sm_count(torch.device("cuda", 3)) == 103
    assert ops.sm_count(torch.device("cuda")) == 102
    assert ops.sm_count(torch.device("cuda", 1)) == 101
    assert asked == [1, 3, 2]
    assert ops.sm_count(torch.device("cpu")) == ops.INTERPRETER_SM_COUNT
    with ops.override_ce_launch(programs_per_sm=1.5):
        assert ops.ce_launch_config(128256, 2, torch.device("cuda", 3)).programs == 154
        assert ops.ce_launch_config(128256, 2, torch.device("cpu")).programs == 6


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only: the interpreter's launches")
def test_sm_count_off_cuda_never_asks_cuda(monkeypatch):
    """Without CUDA a persistent launch on CPU tensors uses the stand-in SM count and never
    asks torch.cuda (which would raise); sm_count of a "cuda" device raises there, loudly,
    rather than inventing a count."""
    def boom(*args, **kwargs):
        raise AssertionError("torch.cuda asked off CUDA")

    monkeypatch.setattr(ops, "_sm_counts", {})
    with pytest.raises(Exception):  # noqa: B017 - whatever torch raises without CUDA
        ops.sm_count(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", boom)
    monkeypatch.setattr(torch.cuda, "current_device", boom)
    z, t, _, _ = data(7, 20, seed=3)
    with ops.override_ce_launch(programs_per_sm=0.5):
        res = ops.cross_entropy_forward(z, t, reduction="none", compute_grad=False,
                                        block=BLOCK)
    rows, _, _ = reference(z, t)
    rowwise_close(res.loss, rows)


def test_adopt_interpreter_globals_keeps_own_names():
    """The interpreter's module-level names are bound in the namespace except its own names
    and dunders; the kernels module's helpers stay crossent's after a launch."""
    import importlib

    interpreter = importlib.import_module("triton.runtime.interpreter")
    sentinel = object()
    ns = {"tl": sentinel, "np": sentinel, "__name__": "mine"}
    kernels.adopt_interpreter_globals(ns, frozenset({"tl", "np", "__name__"}))
    assert ns["tl"] is sentinel and ns["np"] is sentinel and ns["__name__"] == "mine"
    extra = {k for k in vars(interpreter) if not (k.startswith("__") and k.endswith("__"))}
    assert extra - {"tl", "np"} <= set(ns)
    assert all(ns[k] is vars(interpreter)[k] for k in extra - {"tl", "np"})
    if kernels.interpreting():
        kernels.compiled()
        assert kernels.tl.__name__ == "triton.language"
        assert kernels._ce_row is not None and kernels._tanh is not None
        assert callable(kernels.ce_kernel) and kernels.ce_row_source.__name__ == "ce_row_source"


# ---------------------------------------------------------------- compiled for sm_90

def test_constexpr_paths_compile_for_sm90(sm90_compile):
    """Every (REVERSE, PERSISTENT) pair with index targets + GRAD + every option (bf16), with
    probability targets and GRAD off, with index targets, smoothing and GRAD off; and
    triton's constant specialisations of V = 1, one row, ignore_index = 1 (none of these
    are in the "kernels" group): compile_for_gpu.py's "constexpr" group, run in a fresh
    process by conftest's ``sm90_compile`` (this one may hold the interpreter)."""
    if DEVICE == "cuda":
        pytest.skip("on CUDA the other tests compile the kernels themselves")
    assert "FAIL constexpr" not in sm90_compile, sm90_compile
    assert sm90_compile.count("ok constexpr ") == 15, sm90_compile
