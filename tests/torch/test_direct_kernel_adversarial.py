"""Adversarial tests of the opt-in compiled CPU kernel's direct route (H15): inductor's
one-thread C function called through ``ctypes`` on crossent's block workers
(:class:`crossent.torch._inductor._DirectKernel`), its in-place write-back of rows redone
with the max shift, the library remembered in crossent's cache folder, and float32 routed
too. Everything goes through the public ``crossent.torch`` entry points where it can,
against float64 ``torch.nn.functional.cross_entropy``.

The tests under "H15's findings" failed before their fixes (a crash, a hang, or a silently
wrong number: the default dtype or device leaking into the kernel's buffers, a damaged
index, a truncated library, a fork while compiling). Crashes and hangs run in a
forked child (one OpenMP thread, as torch's DataLoader workers: GNU OpenMP is not
fork-safe), so they fail the test, not the session. Compiles bfloat16, float16 and float32
direct kernels once each (shared with ``test_inductor_kernel.py`` in one session)."""

from __future__ import annotations

import concurrent.futures
import ctypes
import faulthandler
import json
import mmap
import multiprocessing
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import traceback

import pytest
import torch
import torch.nn.functional as F

import crossent.torch as xt
from crossent.torch import _inductor

pytestmark = [pytest.mark.skipif(not _inductor.available(), reason="no C++ compiler"),
              pytest.mark.timeout(300)]

INF, NAN = float("inf"), float("nan")
# relative error of one rounding to the dtype (float32: the float32 exp-sum's few ulps)
REL = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -20}


@pytest.fixture
def direct(monkeypatch, workers):
    """The compiled kernel on (two threads at least, block workers on); the direct
    kernel's calls recorded as ``(z pointer, z shape, i, j)`` (the probe's included)."""
    calls: list[tuple[int, tuple[int, ...], int, int]] = []
    original = _inductor._DirectKernel.__call__

    def counted(self, z, k, a, s, out, i, j):
        calls.append((z.data_ptr(), tuple(z.shape), i, j))
        return original(self, z, k, a, s, out, i, j)

    monkeypatch.setattr(_inductor._DirectKernel, "__call__", counted)
    previous = xt.set_compiled_kernel(True)
    yield calls
    xt.set_compiled_kernel(previous)


def _ours(z, y, inplace=False, grad_output=None, **options):
    x = z.clone().requires_grad_()
    loss = xt.cross_entropy(x, y, backend="rowblock", inplace_backward=inplace, **options)
    loss.backward(None if grad_output is None else grad_output.to(loss.dtype))
    return loss.detach().double(), x.grad.double()


def _reference(z, y, grad_output=None, **options):
    x = z.double().requires_grad_()
    if options.get("weight") is not None:
        options["weight"] = options["weight"].double()
    loss = F.cross_entropy(x, y, **options)
    loss.backward(grad_output)
    return loss.detach(), x.grad


def _assert_matches(ours, ref, dtype, scale, roundings=1):
    """Loss and gradient of ``ours`` as float64 ``ref``: NaN and infinities in the same
    places, finite entries within ``roundings`` roundings to ``dtype`` plus the float32
    exp-sum's error (``C 2^-24`` times the row scale ``scale``)."""
    for got, want, rel in ((ours[0], ref[0], 2 * REL[dtype]),
                           (ours[1], ref[1], roundings * REL[dtype])):
        assert torch.equal(got.isnan(), want.isnan()), (got, want)
        finite = want.isfinite()
        assert torch.equal(got[~finite & ~want.isnan()], want[~finite & ~want.isnan()])
        got, want = got[finite], want[finite]
        tiny = 2.0 ** -24 if dtype == torch.float16 else 0.0  # float16's subnormal spacing
        bound = want.abs() * rel + tiny + scale * 2.0 ** -24 * max(ref[1].shape[-1], 1)
        assert bool(((got - want).abs() <= bound).all()), float((got - want).abs().max())


def _check(z, y, calls=None, inplace=False, **options):
    if calls is not None:
        calls.clear()
    ours = _ours(z, y, inplace=inplace, **options)
    ref = _reference(z, y, **options)
    _assert_matches(ours, ref, z.dtype, 1.0 / max(z.shape[0], 1))
    if calls is not None and min(z.shape) > 1:  # the direct route: every row exactly once
        mine = [c for c in calls if c[1] == tuple(z.shape)]  # not the probe's
        assert mine, "expected the direct kernel"
        batch = mine[0][0]  # the batch's blocks come first (then any redone rows' copy)
        rows = sorted(i for p, _, lo, hi in mine if p == batch for i in range(lo, hi))
        assert rows == list(range(z.shape[0])), calls
    return ours


def _logits(rows, classes, seed, dtype=torch.bfloat16, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, classes, generator=g) * scale).to(dtype)
    return z, torch.randint(0, classes, (rows,), generator=g)


def _library(dtype, monkeypatch) -> str:
    """The path of this process's direct-kernel library for ``dtype`` (loaded now if not
    yet), kept in ``_libraries`` for the test: where a remembered index turns bad, the
    process falls back to it."""
    assert _inductor._direct_kernel(dtype) is not None
    path = _inductor._libraries.get(dtype) or _inductor._remembered(dtype)
    assert path is not None
    monkeypatch.setitem(_inductor._libraries, dtype, path)
    return path


def _in_forked_child(fn, timeout=30.0) -> int | None:
    """``fn()`` in a forked child with one torch thread; its exit code (0: ``fn()`` was
    true; minus a signal's number: it crashed; None: still running after ``timeout``
    seconds, then killed)."""

    def target():
        code = 1
        try:
            faulthandler.disable()  # pytest's handler writes to the terminal: the code says it
            torch.set_num_threads(1)
            code = 0 if fn() else 1
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)

    child = multiprocessing.get_context("fork").Process(target=target)
    child.start()
    child.join(timeout)
    if child.exitcode is None:
        child.kill()
        child.join()
        return None
    return child.exitcode


# ---- attacks that held: shapes, block splits, thresholds, non-finite rows, options


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_small_shape_and_odd_block_split_matches_float64(dtype, direct, monkeypatch):
    for split in (1, 3):  # blocks of 2 rows (an odd last row joins), or of 3 rows
        for classes in (1, 2, 3, 7, 8, 9, 15, 16, 17):
            monkeypatch.setattr(_inductor, "_DIRECT_BLOCK_ELEMENTS", split * classes)
            for rows in (1, 2, 3, 5):
                z, y = _logits(rows, classes, 100 * classes + rows, dtype)
                _check(z, y, direct, inplace=bool(rows % 2))
    assert direct  # the direct route ran


def test_huge_rows(direct):
    for classes in (100003, 256000):
        for rows in (1, 2, 3):
            z, y = _logits(rows, classes, classes + rows, scale=2.0)
            _check(z, y, direct, inplace=rows == 2)
    assert direct


def _hard_rows(dtype):
    """Rows past each threshold of the target shift (``z_c - z_y`` beyond 44: ``s`` past
    2^64; beyond 88.7: ``exp`` overflows float32) and every kind of non-finite row."""
    z, y = _logits(18, 40, 5, dtype, scale=1.0)
    z, y = z.float(), y.clone()
    for n, gap in enumerate((43.0, 44.3, 44.5, 60.0, 88.0, 88.8, 100.0, 1000.0)):
        z[n, (y[n] + 1) % 40] = z[n, y[n]] + gap
    z[8, :] = -30.0
    z[8, y[8]] = -30.0 - 50.0  # the target far below every other class
    z[9, y[9]] = -INF
    z[10, (y[10] + 2) % 40] = INF
    z[11, y[11]] = INF
    z[12, 7] = NAN
    z[13, :] = -INF
    z[14, :] = INF
    if dtype == torch.float16:  # float16's own range: +-65504
        z[15, :] = -65504.0
        z[15, (y[15] + 1) % 40] = 65504.0
    y[16] = y[17] = -100  # ignored rows taking the redo path
    z[16, (y[15] + 3) % 40] = 200.0
    z[17, 3] = INF
    return z.to(dtype), y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_overflow_thresholds_and_non_finite_rows_in_place_and_not(dtype, direct):
    z, y = _hard_rows(dtype)
    ours = _check(z, y, direct)
    assert torch.equal(_check(z, y, direct, inplace=True)[1].isnan(), ours[1].isnan())
    # rows whose softmax is finite (a +inf logit makes torch's NaN: inf - inf)
    ok = [n for n in range(16) if n not in (10, 11, 12, 13, 14)]
    assert bool(ours[1][ok].isfinite().all())


def test_class_weights_zero_tiny_and_all_ignored(direct):
    for dtype in (torch.bfloat16, torch.float32):
        z, y = _logits(20, 30, 3, dtype)
        weight = torch.rand(30, generator=torch.Generator().manual_seed(4)) + 0.1
        weight[y[0]], weight[y[1]] = 0.0, 1e-35
        ours = _check(z, y, direct, weight=weight.to(dtype))
        # row 1's scale a ~ 1e-36: a / s first would underflow float32 and lose its digits
        ref = _reference(z, y, weight=weight.to(dtype))[1][1]
        normal = ref.abs() > 2.0 ** -123  # float32's normal range, with a margin
        assert int(normal.sum()) >= 3, ref
        torch.testing.assert_close(ours[1][1][normal], ref[normal], rtol=REL[dtype], atol=0)
        # every weight 1e-35
        _check(z, y, direct, inplace=True, weight=torch.full((30,), 1e-35).to(dtype))
        _check(z, y, direct, weight=torch.zeros(30, dtype=dtype))  # 0 / 0: NaN, as torch
        _check(z, torch.full_like(y, -100), direct)  # all ignored: NaN loss, as torch
        _check(z[:0], y[:0])  # no rows at all


def test_reduction_none_with_non_finite_grad_output(direct):
    grad_output = torch.tensor([INF, NAN, 0.0, -INF, -2.0, 3.0] * 4, dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float32):
        z, y = _logits(24, 50, 8, dtype)
        y[3] = -100
        ours = _ours(z, y, reduction="none", grad_output=grad_output)
        ref = _reference(z, y, reduction="none", grad_output=grad_output)
        # the stored gradient times grad_output in backward: a second rounding (documented)
        _assert_matches(ours, ref, dtype, 3.0, roundings=2)
    assert direct


def test_linear_head_float32_with_non_finite_grad_output_matches_the_row_block_kernel(
        direct):
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(24, 16, generator=g), torch.randn(200, 16, generator=g) / 4
    y = torch.randint(0, 200, (24,), generator=g)
    y[5] = -100
    grad_output = torch.tensor([INF, NAN, 0.0, -2.0] + [1.0] * 20)
    results = {}
    for on in (True, False):
        xt.set_compiled_kernel(on)
        direct.clear()
        inputs = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        loss = xt.linear_cross_entropy(*inputs, y, reduction="none")
        loss.backward(grad_output)
        results[on] = [loss.detach(), *(t.grad for t in inputs)]
        assert bool(direct) == on
    ref_inputs = [x.double().requires_grad_(), w.double().requires_grad_()]
    ref = F.cross_entropy(ref_inputs[0] @ ref_inputs[1].T, y, reduction="none")
    ref.backward(grad_output.double())
    for ours, other, want in zip(results[True], results[False],
                                 [ref.detach(), *(t.grad for t in ref_inputs)], strict=True):
        torch.testing.assert_close(ours.double(), want, rtol=1e-4, atol=1e-5, equal_nan=True)
        torch.testing.assert_close(ours, other, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_views_with_storage_offsets_transposed_and_expanded_logits(direct):
    g = torch.Generator().manual_seed(10)
    y = torch.randint(0, 300, (40,), generator=g)
    # an odd storage offset (not 4-byte aligned), in place into the base's storage
    base = (torch.randn(41 * 300 + 7, generator=g) * 3).bfloat16().requires_grad_()
    before = base.detach().clone()
    logits = base[307:].view(40, 300)
    assert logits.is_contiguous() and logits.data_ptr() % 4 == 2
    direct.clear()
    loss = xt.cross_entropy(logits, y, backend="rowblock", inplace_backward=True)
    loss.backward()
    assert logits.data_ptr() in {p for p, shape, _, _ in direct if shape == (40, 300)}
    ref = _reference(before[307:].view(40, 300), y)
    _assert_matches((loss.detach().double(), base.grad[307:].view(40, 300).double()), ref,
                    torch.bfloat16, 1 / 40)
    assert bool((base.grad[:307] == 0).all())
    assert torch.equal(base.detach()[:307], before[:307])  # nothing written before the view
    # transposed (a copy is made) and expanded rows (one row's memory shared by four)
    z = (torch.randn(300, 40, generator=g) * 3).bfloat16()
    _check(z.t(), y, inplace=True)
    row = (torch.randn(1, 300, generator=g) * 3).bfloat16().requires_grad_()
    loss = xt.cross_entropy(row.expand(4, 300), y[:4], backend="rowblock",
                            inplace_backward=True)
    loss.backward()
    ref_row = row.detach().double().requires_grad_()
    F.cross_entropy(ref_row.expand(4, 300), y[:4]).backward()
    torch.testing.assert_close(row.grad.double(), ref_row.grad, rtol=2 ** -6, atol=1e-4)


def test_threads_at_once_with_redo_rows_in_place_and_two_dtypes(direct):
    batches = []
    for n in range(6):
        z, y = _logits(40, 310, 20 + n, (torch.bfloat16, torch.float32)[n % 2])
        z[n, (y[n] + 1) % 310] = 100.0  # a row redone with the max shift
        batches.append((z, y))
    alone = [_ours(z, y, inplace=True) for z, y in batches]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda b: _ours(*b, inplace=True), batches))
    for one, other, (z, y) in zip(alone, together, batches, strict=True):
        assert torch.equal(one[0], other[0]) and torch.equal(one[1], other[1])
        _assert_matches(other, _reference(z, y), z.dtype, 1 / 40)


def test_one_thread_modes_inference_and_dynamo_reset_keep_the_direct_kernel(direct):
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class Counting(TorchDispatchMode):
        seen = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counting.seen += 1
            return func(*args, **(kwargs or {}))

    z, y = _logits(40, 300, 11)
    z[2, (y[2] + 1) % 300] = 100.0
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one block (no workers)
        _check(z, y, direct)
    finally:
        torch.set_num_threads(threads)
    with Counting():  # blocks in the calling thread under a mode
        _check(z, y, direct)
    assert Counting.seen
    with FlopCounterMode(display=False):
        _check(z, y, direct, inplace=True)
    with torch.inference_mode():  # no gradient: the loss alone, from another kernel
        loss = xt.cross_entropy(z, y, backend="rowblock")
    torch.testing.assert_close(loss.double(), _reference(z, y)[0], rtol=2 ** -7, atol=0)
    torch._dynamo.reset()  # the loaded library stays mapped and in use
    _check(z, y, direct)


def _at_page_end(numel, dtype, keep):
    """A tensor whose last byte ends a page followed by an unmapped (PROT_NONE) page: a
    read or write past its end faults."""
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    size = torch.empty((), dtype=dtype).element_size() * numel
    pages = -(-size // mmap.PAGESIZE) + 1
    buf = mmap.mmap(-1, (pages + 1) * mmap.PAGESIZE)
    keep.append(buf)
    start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(start + pages * mmap.PAGESIZE, mmap.PAGESIZE, 0) == 0
    return torch.frombuffer(buf, dtype=dtype, count=numel, offset=pages * mmap.PAGESIZE - size)


def test_the_direct_kernel_touches_nothing_past_the_last_row(direct):
    """Raw pointers, no guards: the vector loops' tails must not read or write past the
    logits or the gradient (each here ends at an unmapped page), in place or not."""
    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        for classes in (17, 33, 300):
            z, y = _logits(6, classes, classes, dtype)
            z[1, (y[1] + 1) % classes] = 100.0  # a row redone with the max shift
            cases.append((z, y, _reference(z, y)[1]))

    def child():
        keep: list = []
        for z0, y, want in cases:
            n, classes = z0.shape
            a = torch.full((n,), 1 / n)
            z = _at_page_end(z0.numel(), z0.dtype, keep).view(n, classes)
            z.copy_(z0)
            out = _at_page_end(z0.numel(), z0.dtype, keep).view(n, classes)
            direct.clear()
            grad = _inductor.softmax_grad_rows(z, y, a, -a, out=out)[0]
            same = _inductor.softmax_grad_rows(z, y, a, -a, out=z)[0]
            called = {p for p, shape, _, _ in direct if shape == (n, classes)}
            err = float((grad.double() - want).abs().max())
            if not (torch.equal(grad, same) and err < 1e-3 and z.data_ptr() in called):
                return False
        return True

    assert _in_forked_child(child) == 0


def test_a_relative_cache_folder_is_used_from_the_working_directory(
        monkeypatch, tmp_path, workers):
    library = _library(torch.bfloat16, monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CROSSENT_CACHE_DIR", "relative/cache")
    monkeypatch.setattr(_inductor, "_direct_kernels", {})
    assert _inductor._direct_kernel(torch.bfloat16) is not None
    index = tmp_path / "relative" / "cache" / os.path.basename(
        _inductor._index_path(torch.bfloat16))
    assert json.loads(index.read_text())["library"] == library
    assert _inductor._remembered(torch.bfloat16) == library


# ---- attacks that held: the remembered library and its index


def test_a_forged_source_beside_another_library_is_refused_by_the_probe(
        monkeypatch, tmp_path, workers):
    float32_library = _library(torch.float32, monkeypatch)
    bf16_library = _library(torch.bfloat16, monkeypatch)
    monkeypatch.setenv("CROSSENT_CACHE_DIR", str(tmp_path / "cache"))
    index = _inductor._index_path(torch.bfloat16)
    os.makedirs(os.path.dirname(index))
    bf16_source = bf16_library[:-3] + ".cpp"
    # the float32 library with a source claiming the bfloat16 signature: the signature check
    # passes, the probe (bfloat16 rows read as float32) refuses it
    shutil.copy(float32_library, tmp_path / "swapped.so")
    shutil.copy(bf16_source, tmp_path / "swapped.cpp")
    # and a library with the right signature doing nothing at all
    (tmp_path / "noop.c").write_text(
        "void kernel(const void* z, const float* k, const float* a, float* s, void* out,"
        " long rows, long classes) {}\n")
    cc = next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))))
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "noop.so"),
                    str(tmp_path / "noop.c")], check=True, timeout=60)
    shutil.copy(bf16_source, tmp_path / "noop.cpp")
    for fake in ("swapped.so", "noop.so"):
        _inductor._remember(torch.bfloat16, str(tmp_path / fake))
        assert _inductor._remembered(torch.bfloat16) == str(tmp_path / fake)
        assert _inductor._wrap(str(tmp_path / fake), torch.bfloat16) is None
        monkeypatch.setattr(_inductor, "_direct_kernels", {})
        assert _inductor._direct_kernel(torch.bfloat16) is not None
        with open(index) as f:  # replaced by this process's own library
            assert json.load(f)["library"] == bf16_library


def test_concurrent_index_writers_leave_a_whole_path_and_no_partial_file(
        monkeypatch, tmp_path):
    cache, libraries = tmp_path / "cache", tmp_path / "libraries"
    monkeypatch.setenv("CROSSENT_CACHE_DIR", str(cache))
    index = _inductor._index_path(torch.bfloat16)
    libraries.mkdir()
    paths = []
    for n in range(4):  # long paths: a torn write would show
        path = libraries / (f"{n}" + "x" * 200 + ".so")
        path.write_bytes(bytes([n]) * 1000)
        paths.append(str(path))
    _inductor._remember(torch.bfloat16, paths[0])
    seen, stop = set(), threading.Event()

    def read():
        while not stop.is_set():
            with open(index) as f:
                seen.add(json.load(f)["library"])

    def write(path):
        for _ in range(100):
            _inductor._remember(torch.bfloat16, path)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(p,)) for p in paths]
    for t in writers:
        t.start()
    for t in writers:
        t.join(60)
    stop.set()
    reader.join(60)
    assert seen and seen <= set(paths)  # never empty, never half a path
    assert os.listdir(cache) == [os.path.basename(index)]


def test_fork_after_loading_the_child_gets_the_same_results(direct):
    z, y = _logits(40, 300, 12)
    z[5, (y[5] + 1) % 300] = 100.0
    want = _ours(z, y, inplace=True)  # loads the kernel in the parent
    assert direct

    def child():
        got = _ours(z, y, inplace=True)
        return torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    assert _in_forked_child(child) == 0


def test_a_new_process_loads_the_remembered_library_with_dynamo_disabled(
        workers, monkeypatch):
    _inductor._remember(torch.bfloat16, _library(torch.bfloat16, monkeypatch))
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        import crossent.torch as xt
        from crossent.torch import _backends, _inductor
        _backends.NATIVE_MAX_LOGITS = 0
        torch.set_num_threads(2)
        def no_compiling(*args):
            raise AssertionError("compiled")
        _inductor._compile_one_thread = no_compiling
        xt.set_compiled_kernel(True)
        g = torch.Generator().manual_seed(0)
        z = (torch.randn(40, 300, generator=g) * 4).bfloat16()
        y = torch.randint(0, 300, (40,), generator=g)
        z[1, (y[1] + 1) % 300] = 100.0
        x = z.clone().requires_grad_()
        xt.cross_entropy(x, y, backend="rowblock").backward()
        r = z.double().requires_grad_()
        F.cross_entropy(r, y).backward()
        kernel = _inductor._direct_kernels[torch.bfloat16]
        assert kernel is not None and kernel.inplace
        err = float((x.grad.double() - r.grad).abs().max())
        assert err < 1e-3, err
        print("OK")
    """)
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stderr[-3000:]


# ---- H15's findings, fixed (each failed before its fix)


def test_default_dtype_float64_gives_torchs_numbers(direct):
    z, y = _logits(40, 300, 13)
    _ours(z, y)  # the kernel loaded under the usual default
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _check(z, y, direct)
    finally:
        torch.set_default_dtype(previous)


def test_default_dtype_float16_neither_corrupts_memory_nor_the_loss(direct):
    z, y = _logits(400, 300, 14)
    want = _ours(z, y)  # loads the kernel in the parent

    def child():
        torch.set_default_dtype(torch.float16)
        got = _ours(z, y)
        return torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    assert _in_forked_child(child) == 0


def test_first_use_under_a_meta_device_context_does_not_crash(direct, monkeypatch):
    z, y = _logits(40, 300, 15)
    want = _ours(z, y)
    # remembered: the child loads it as a new process would
    _inductor._remember(torch.bfloat16, _library(torch.bfloat16, monkeypatch))

    def child():
        _inductor._direct_kernels.clear()
        with torch.device("meta"):
            got = _ours(z, y)
        return torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    assert _in_forked_child(child) == 0


def test_an_index_that_is_not_text_is_ignored(monkeypatch, tmp_path, workers):
    _library(torch.bfloat16, monkeypatch)
    monkeypatch.setenv("CROSSENT_CACHE_DIR", str(tmp_path))
    index = _inductor._index_path(torch.bfloat16)
    os.makedirs(os.path.dirname(index), exist_ok=True)
    with open(index, "wb") as f:
        f.write(b"\xff\xfe\x00 a damaged index")
    monkeypatch.setattr(_inductor, "_direct_kernels", {})
    assert _inductor._direct_kernel(torch.bfloat16) is not None


def test_a_source_that_is_not_text_beside_the_library_is_ignored(
        monkeypatch, tmp_path, workers):
    library = _library(torch.bfloat16, monkeypatch)
    monkeypatch.setenv("CROSSENT_CACHE_DIR", str(tmp_path))
    shutil.copy(library, tmp_path / "k.so")
    (tmp_path / "k.cpp").write_bytes(b"\xff\xfe damaged")
    _inductor._remember(torch.bfloat16, str(tmp_path / "k.so"))
    monkeypatch.setattr(_inductor, "_direct_kernels", {})
    assert _inductor._direct_kernel(torch.bfloat16) is not None


def test_no_partial_index_file_is_left_behind(monkeypatch, tmp_path, workers):
    _library(torch.bfloat16, monkeypatch)
    monkeypatch.setenv("CROSSENT_CACHE_DIR", str(tmp_path))
    index = _inductor._index_path(torch.bfloat16)
    os.makedirs(index)  # where the index would go, a folder
    monkeypatch.setattr(_inductor, "_direct_kernels", {})
    assert _inductor._direct_kernel(torch.bfloat16) is not None  # held: still found
    assert os.listdir(tmp_path) == [os.path.basename(index)]


def test_fork_while_another_thread_holds_the_compile_lock_does_not_hang(
        direct, monkeypatch):
    z, y = _logits(40, 300, 16)
    want = _ours(z, y)
    # remembered: a child can load it in milliseconds
    _inductor._remember(torch.bfloat16, _library(torch.bfloat16, monkeypatch))
    held, release = threading.Event(), threading.Event()

    def loading():  # another thread compiling or loading a kernel at the fork
        with _inductor._compile_lock:
            held.set()
            release.wait(30)

    thread = threading.Thread(target=loading)
    thread.start()
    held.wait(30)

    def child():
        _inductor._direct_kernels.clear()  # this dtype's first call in the child
        got = _ours(z, y)
        return torch.equal(got[0], want[0])

    try:
        code = _in_forked_child(child, timeout=5.0)
    finally:
        release.set()
        thread.join(30)
    assert code == 0


def test_a_truncated_library_named_by_the_index_does_not_crash(
        direct, tmp_path, monkeypatch):
    z, y = _logits(40, 300, 17)
    want = _ours(z, y)
    library = _library(torch.bfloat16, monkeypatch)
    shutil.copy(library, tmp_path / "cut.so")
    shutil.copy(library[:-3] + ".cpp", tmp_path / "cut.cpp")
    os.environ["CROSSENT_CACHE_DIR"] = str(tmp_path)  # (the child's, restored below)
    monkeypatch.setenv("CROSSENT_CACHE_DIR", str(tmp_path))
    _inductor._remember(torch.bfloat16, str(tmp_path / "cut.so"))  # whole when remembered
    with open(library, "rb") as f:
        (tmp_path / "cut.so").write_bytes(f.read(1000))  # then cut: an interrupted copy

    def child():
        _inductor._direct_kernels.clear()
        got = _ours(z, y)
        return torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    assert _in_forked_child(child) == 0


def test_negated_view_is_read_with_its_sign(direct):
    # a contiguous negated view (is_neg: a lazy sign bit over raw memory) would be read
    # unnegated by the direct kernel's raw pointer (loss off by ~1): _inductor.serves sends
    # it to the row-block kernel's torch operations, which resolve the sign (found by H38)
    for dtype in (torch.bfloat16, torch.float32):
        z, y = _logits(24, 50, 8, dtype)
        neg = torch._neg_view(-z)
        assert neg.is_neg() and neg.is_contiguous()
        direct.clear()
        x = neg.detach().requires_grad_()
        loss = xt.cross_entropy(x, y, backend="rowblock")
        loss.backward()
        assert not any(c[0] == neg.data_ptr() for c in direct)
        _assert_matches((loss.detach().double(), x.grad.double()), _reference(z, y), dtype, 3.0)
