"""The opt-in compiled (inductor CPU) gradient kernel ``crossent.torch._inductor``, against
float64 torch: loss and gradient of index targets with ignore_index and class weights,
confident rows (true-class ``p - 1`` in float32 before rounding, PITFALLS 6), -inf and NaN
logits, in place, one row / one class. Every test runs through both routes: the direct
kernel (the generated one-thread C function called through ctypes on the block workers)
and the compiled callable (where the direct kernel is not found). One compilation per
route and dtype serves every test (dynamic shapes)."""

from __future__ import annotations

import concurrent.futures
import ctypes
import json
import os

import pytest
import torch
import torch.nn.functional as F

from crossent.torch import _inductor

pytestmark = [pytest.mark.skipif(not _inductor.available(), reason="no C++ compiler"),
              pytest.mark.timeout(300)]

BF16_ULP = 2.0 ** -8  # bfloat16: 8 significant bits; one rounding is within half of this


@pytest.fixture(autouse=True, params=["direct", "callable"])
def route(request, monkeypatch, workers):
    """``"direct"``: blocks of at least 2 rows, several per call, on the block workers,
    each one ctypes call (counted); ``"callable"``: the direct kernel not found."""
    calls = []
    if request.param == "direct":
        original = _inductor._DirectKernel.__call__

        def counted(self, z, k, a, s, out, i, j):
            calls.append((z.data_ptr(), i, j))
            return original(self, z, k, a, s, out, i, j)

        monkeypatch.setattr(_inductor._DirectKernel, "__call__", counted)
        monkeypatch.setattr(_inductor, "_DIRECT_BLOCK_ELEMENTS", 1000)
    else:
        monkeypatch.setattr(_inductor, "_direct_kernel", lambda dtype: None)
    return request.param, calls


def _row_scalars(y, weight, ignore_index):
    """``a``, ``c`` of the mean loss with torch's semantics: a = -c = w[y] / sum w[y]."""
    valid = y != ignore_index
    safe = torch.where(valid, y, 0)
    w = torch.ones(()) if weight is None else weight[safe]
    mass = torch.where(valid, w, 0.0).float()
    scale = mass / mass.sum()
    return safe, scale, -scale


def _reference(z, y, weight, ignore_index):
    x = z.double().requires_grad_()
    w = None if weight is None else weight.double()
    loss = F.cross_entropy(x, y, weight=w, ignore_index=ignore_index)
    return loss.detach(), torch.autograd.grad(loss, x)[0]


def _check(z, y, weight=None, ignore_index=-100, inplace=False, route=None):
    safe, a, c = _row_scalars(y, weight, ignore_index)
    if route is not None:
        route[1].clear()
    ref_loss, ref_grad = _reference(z, y, weight, ignore_index)
    work = z.clone()
    grad, lse, nll = _inductor.softmax_grad_rows(work, safe, a, c,
                                                 out=work if inplace else None)
    assert grad.dtype == z.dtype and lse.dtype == torch.float32
    if inplace:
        assert grad.data_ptr() == work.data_ptr()
    counted = a != 0
    loss = (nll.double() * a.double())[counted].sum()
    # float32 sum of C exponentials: |ds| <= C 2^-24 s, so |d nll| <= C 2^-24 (any float32
    # kernel, torch's included: a confident row's 1 + 1.5e-4 carries ~1e-7 absolute error)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=z.shape[1] * 2.0 ** -24)
    x = z.double()
    torch.testing.assert_close(lse.double(), x.logsumexp(1), rtol=1e-6, atol=1e-6)
    err = (grad.double() - ref_grad).abs()
    rel = {torch.bfloat16: BF16_ULP, torch.float16: 2.0 ** -11}.get(z.dtype, 2.0 ** -20)
    # float16's subnormals (below 2^-14) are spaced 2^-24 apart
    tiny = 2.0 ** -24 if z.dtype == torch.float16 else 0.0
    # one rounding, plus the float32 exp-sum's error (see above) times the row scale
    bound = ref_grad.abs() * rel + tiny + z.shape[1] * 2.0 ** -24 * float(a.abs().max())
    assert bool((err <= bound).all()), float((err - bound).max())
    assert bool((grad[~counted] == 0).all())
    if route is not None and route[0] == "direct" and min(z.shape) > 1:
        # every row of the batch in exactly one call of at least 2 rows, several calls
        done = sorted((i, j) for p, i, j in route[1] if p == work.data_ptr())
        assert [i for c in done for i in range(*c)] == list(range(z.shape[0]))
        assert all(j - i >= 2 for i, j in done)
        # the fixture's blocks, at most a worker's share; a last odd row joins
        step = max(2, min(1000 // z.shape[1], -(-z.shape[0] // torch.get_num_threads())))
        assert len(done) == max(1, z.shape[0] // step + (z.shape[0] % step >= 2))
    return grad, lse, nll


def _logits(rows, classes, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, classes, generator=g) * scale).bfloat16(), g


def test_plain_weighted_and_ignored_rows_match_float64_torch(route):
    z, g = _logits(37, 300, 0)
    y = torch.randint(0, 300, (37,), generator=g)
    _check(z, y, route=route)
    y[::5] = -100
    weight = torch.rand(300, generator=g) + 0.1
    _check(z, y, weight=weight, route=route)
    y[y == -100] = 3
    y[::7] = 299  # ignore_index a real class id: still in the denominator
    _check(z, y, weight=weight, ignore_index=299, route=route)


def test_confident_rows_keep_their_true_class_gradient(route):
    # p_y = 1 - 1e-4: in bfloat16 p_y rounds to 1 and p_y - 1 to 0; float32 keeps it
    z, g = _logits(8, 500, 1, scale=0.0)
    y = torch.randint(0, 500, (8,), generator=g)
    z[torch.arange(8), y] = 15.0  # 499 e^-15 = 1.5e-4 off 1
    grad, _, _ = _check(z, y, route=route)
    true = grad[torch.arange(8), y].double()
    ref = _reference(z, y, None, -100)[1][torch.arange(8), y]
    assert bool((true < 0).all())  # rounded before subtracting 1, it would be 0
    torch.testing.assert_close(true, ref, rtol=0.05, atol=0)  # float32 sum: ~1% here


def test_minus_inf_logits_give_zero_gradient_and_nan_propagates_like_torch(route):
    z, g = _logits(6, 64, 2)
    y = torch.randint(0, 64, (6,), generator=g)
    y[y == 0] = 1
    z[:, 0] = float("-inf")  # a masked class
    grad, _, _ = _check(z, y, route=route)
    assert bool((grad[:, 0] == 0).all())
    z[2, 5] = float("nan")  # counted row: NaN loss and gradient, as torch
    z[3, 7] = float("nan")  # ignored row: NaN too, as torch (exp(NaN) * 0)
    y[3] = -100
    safe, a, c = _row_scalars(y, None, -100)
    grad, lse, _ = _inductor.softmax_grad_rows(z.clone(), safe, a, c)
    assert bool(lse[2].isnan()) and bool(grad[2].isnan().all())
    ref = _reference(z, y, None, -100)[1]
    assert bool(ref[3].isnan().all()) and bool(grad[3].isnan().all())
    rest = torch.tensor([0, 1, 4, 5])
    assert bool(grad[rest].isfinite().all())


def test_rows_far_from_their_target_take_the_max_shift(route):
    # z_c - z_y = 100: exp overflows with the target shift; the row is redone from its max
    z, g = _logits(9, 80, 7)
    y = torch.randint(0, 80, (9,), generator=g)
    z[2, (int(y[2]) + 1) % 80] = 100.0
    z[5, :] = -50.0
    z[5, (int(y[5]) + 3) % 80] = 60.0  # in place too: the row is redone before the copy
    y[6] = -100
    z[6, 0] = 120.0  # an ignored row taking the other path
    _check(z, y, route=route)
    _check(z, y, inplace=True, route=route)


def test_in_place_equals_new_buffer_across_blocks(monkeypatch, workers, route):
    z, g = _logits(23, 200, 3)
    y = torch.randint(0, 200, (23,), generator=g)
    y[4] = -100
    monkeypatch.setattr(_inductor, "_BLOCK_ELEMENTS", 5 * 200)  # blocks of 5 rows + 3
    new = _check(z, y, route=route)
    same = _check(z, y, inplace=True, route=route)
    assert all(torch.equal(p, q) for p, q in zip(new, same, strict=True))


def test_one_row_and_one_class(route):
    z, _ = _logits(1, 50, 4)
    _check(z, torch.tensor([3]), route=route)
    _check(z, torch.tensor([3]), inplace=True, route=route)
    z1, _ = _logits(9, 1, 5)
    grad, lse, nll = _check(z1, torch.zeros(9, dtype=torch.long), route=route)
    assert bool((grad == 0).all()) and bool((nll == 0).all())
    assert torch.equal(lse, z1[:, 0].float())


def test_float32_logits(route):
    z, g = _logits(12, 100, 6)
    z = z.float() + torch.randn(12, 100, generator=g) * 1e-3
    y = torch.randint(0, 100, (12,), generator=g)
    _check(z, y, route=route)


def test_float16_logits(route):
    z, g = _logits(21, 130, 8)
    z = z.half()
    y = torch.randint(0, 130, (21,), generator=g)
    y[3] = -100
    _check(z, y, route=route)
    _check(z, y, inplace=True, route=route)


# ---- the direct kernel itself (ctypes on inductor's generated one-thread function)

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_direct_kernel_is_found_and_works_in_place_on_this_torch(dtype, route):
    if route[0] == "callable":
        pytest.skip("the direct kernel itself")
    kernel = _inductor._direct_kernel(dtype)
    assert kernel is not None and kernel.inplace
    # ctypes.CDLL (not PyDLL): the call releases the GIL, so blocks run in parallel
    assert not type(kernel._function)._flags_ & ctypes._FUNCFLAG_PYTHONAPI


def test_a_kernel_disagreeing_with_the_compiled_callable_is_refused(route):
    if route[0] == "callable":
        pytest.skip("the direct kernel itself")
    kernel = _inductor._direct_kernel(torch.bfloat16)
    assert kernel is not None

    class Swapped(_inductor._DirectKernel):  # k and a in each other's place
        def __call__(self, z, k, a, s, out, i, j):
            return super().__call__(z, a, k, s, out, i, j)

    assert _inductor._probe(kernel, torch.bfloat16)
    assert not _inductor._probe(Swapped(kernel._function, 2), torch.bfloat16)
    # a wrong element size puts rows past the first in the wrong place
    assert not _inductor._probe(_inductor._DirectKernel(kernel._function, 4),
                                torch.bfloat16)


def test_signature_of_generated_source():
    source = ('#include <x.h>\nextern "C"  void  kernel(const at::BFloat16* in_ptr0,\n'
              '                       float* out_ptr0,\n  const int64_t ks0)\n{ }')
    assert _inductor._signature(source) == ["const at::BFloat16*", "float*", "const int64_t"]
    assert _inductor._signature(source + source) is None  # two kernels: not ours
    assert _inductor._signature("void kernel(float* x)") is None


def test_without_block_workers_the_compiled_callable_runs(route):
    from crossent.torch import _blockpool

    if route[0] == "callable":
        pytest.skip("the direct kernel's condition")
    _blockpool.set_block_workers(False)  # the fixture turns them back on
    assert _inductor._direct_kernel(torch.bfloat16) is None
    z, g = _logits(11, 90, 9)
    y = torch.randint(0, 90, (11,), generator=g)
    _check(z, y)
    assert not route[1]


def test_threads_calling_at_once_get_their_own_rows(route):
    batches = [_logits(40, 310, 20 + n) for n in range(4)]
    targets = [torch.randint(0, 310, (40,), generator=g) for _, g in batches]
    a = torch.full((40,), 1 / 40)
    alone = [_inductor.softmax_grad_rows(z, y, a, -a)
             for (z, _), y in zip(batches, targets, strict=True)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda n: _inductor.softmax_grad_rows(
            batches[n][0], targets[n], a, -a), range(4)))
    for one, other in zip(alone, together, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(one, other, strict=True))


# ---- the remembered library: a new process loads it instead of compiling

def test_a_found_library_is_remembered_and_loaded_without_compiling(
        route, monkeypatch, tmp_path):
    if route[0] == "callable":
        pytest.skip("the direct kernel itself")
    assert _inductor._direct_kernel(torch.bfloat16) is not None  # found in this process
    monkeypatch.setenv("CROSSENT_CACHE_DIR", str(tmp_path / "cache"))
    compiles = []
    monkeypatch.setattr(_inductor, "_compile_one_thread",
                        lambda *args: compiles.append(args) or pytest.fail("compiled"))
    index = _inductor._index_path(torch.bfloat16)
    assert index.startswith(str(tmp_path)) and not os.path.exists(index)
    monkeypatch.setattr(_inductor, "_direct_kernels", {})
    assert _inductor._direct_kernel(torch.bfloat16) is not None  # this process's library
    with open(index) as f:
        entry = json.load(f)
    assert entry["library"] == _inductor._libraries[torch.bfloat16]
    assert entry["size"] == os.path.getsize(entry["library"])
    monkeypatch.setattr(_inductor, "_direct_kernels", {})
    monkeypatch.setattr(_inductor, "_libraries", {})  # as in a new process
    kernel = _inductor._direct_kernel(torch.bfloat16)
    assert kernel is not None and kernel.inplace and not compiles
    z, g = _logits(13, 70, 11)
    y = torch.randint(0, 70, (13,), generator=g)
    _check(z, y, route=route)


def test_a_stale_or_foreign_index_is_ignored(route, monkeypatch, tmp_path):
    if route[0] == "callable":
        pytest.skip("the direct kernel itself")
    assert _inductor._direct_kernel(torch.float32) is not None
    monkeypatch.setenv("CROSSENT_CACHE_DIR", str(tmp_path))
    index = _inductor._index_path(torch.bfloat16)
    os.makedirs(os.path.dirname(index), exist_ok=True)
    float32_library = _inductor._libraries[torch.float32]
    size, digest = os.path.getsize(float32_library), _inductor._digest(float32_library)
    for stale in ({"library": str(tmp_path / "gone.so"), "size": 1, "sha256": "0"},
                  "not JSON\n\x00", [1, 2], {"library": 3},
                  {"library": float32_library, "size": size, "sha256": digest},
                  {"library": _inductor._libraries[torch.bfloat16], "size": 1,
                   "sha256": digest}):  # a library changed since it was remembered
        with open(index, "w") as f:
            f.write(stale if isinstance(stale, str) else json.dumps(stale))
        assert _inductor._remembered(torch.bfloat16) is None  # missing, or another kernel
        monkeypatch.setattr(_inductor, "_direct_kernels", {})
        assert _inductor._direct_kernel(torch.bfloat16) is not None
        with open(index) as f:  # rewritten with the library found in this process
            assert json.load(f)["library"] == _inductor._libraries[torch.bfloat16]


def test_a_read_only_cache_still_gives_the_kernel(route, monkeypatch, tmp_path):
    if route[0] == "callable":
        pytest.skip("the direct kernel itself")
    assert _inductor._direct_kernel(torch.bfloat16) is not None
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("CROSSENT_CACHE_DIR", str(blocked / "cache"))
    monkeypatch.setattr(_inductor, "_direct_kernels", {})
    assert _inductor._direct_kernel(torch.bfloat16) is not None


def test_the_traced_body_redoes_rows_at_the_threshold_the_caller_checks():
    # the literal 2.0 ** 64 in the body (dynamo would make a global float an input) is
    # _MAX_SUM: a row the body writes back is a row the caller redoes
    assert _inductor._MAX_SUM in _inductor._scaled_softmax.__code__.co_consts
