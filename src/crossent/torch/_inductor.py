"""An opt-in compiled (TorchInductor, CPU C++) softmax cross-entropy kernel for index
targets: per-row loss and the gradient in one generated C++ loop (issue 16).

Per row ``n`` of the logits ``z`` ((M, C), float32 arithmetic whatever the input dtype)::

    k_n   = z_ny  (the target logit; max_c z_nc in rows where that overflows, below)
    s_n   = sum_c exp(z_nc - k_n)
    lse_n = k_n + log s_n,   nll_n = (k_n - z_ny) + log s_n   (= lse_n - z_ny)
    g_nc  = (exp(z_nc - k_n) / s_n) a_n + c_n [c == y_n]    rounded once to z's dtype

``a`` and ``c`` are per-row float32 scalars chosen by the caller (for plain index targets
with "mean": ``a = 1/N``, ``c = -1/N``; class weights only change them: ``a = w[y]/W``,
``c = -w[y]/W``, ``W = sum_n w[y_n]``); rows with ``a == c == 0`` (ignored rows) get a
gradient of 0, except where their softmax is NaN (a NaN logit, a +inf, all -inf): NaN
there, as torch's ``dlogp - p sum(dlogp)`` gives (``NaN * 0``). ``p = exp(z - k) / s``
is formed before it is scaled by ``a`` (``a / s`` first would underflow float32 for a
tiny ``a``, e.g. a class weight of 1e-35, and lose the gradient). The true-class entry
``a p_y + c`` is formed in float32 and rounded once (PITFALLS 6: ``p - 1`` after rounding
to bfloat16 loses a confident row's gradient).

The shift ``k = z_y`` makes ``s >= 1`` and ``nll = log s`` (no cancellation: a confident
row keeps its loss digits) and saves the max pass (measured: 1.38x against 1.55x an exp
pass on one thread); a row where ``s > 2^64`` (some ``z_c - z_y > 44``: ``a / s`` would
near float32's subnormals), or that holds NaN or infinities, is done again, from its still
intact logits, with ``k = max_c z_c``.
Inductor fuses the two row passes (exp, sum and a row-local float32 copy of the
exponentials; scale and round) under one outer loop over rows, so each logit is read from
memory once and ``exp`` is evaluated once per logit (written twice instead of named
once, inductor evaluates it twice: 2.7x an exp pass); the true-class entries are patched
by an O(M) ``index_put_``. Label smoothing, z-loss, softcap and probability targets are not
handled here (the caller keeps its own kernel for them).

:func:`softmax_grad_rows` takes a whole batch (call it once per batch, not per small
block: a call costs ~0.1 ms of small operations). Where it can, it calls the C function
inductor generated for one thread straight through ``ctypes`` (:class:`_DirectKernel`:
~2 us a call, the GIL released), in blocks of up to ``_DIRECT_BLOCK_ELEMENTS`` logits
shared out to crossent's block workers (:mod:`._blockpool`), in place without a copy.
Otherwise (the block workers off, or the function not found as expected) it calls the
compiled callable in blocks of ``_BLOCK_ELEMENTS`` in the calling thread, each one
parallel region on torch's OpenMP threads.

Needs a C++ compiler (``torch._inductor`` compiles on first use: 5-25 s per dtype, then
cached on disk); :func:`available` says whether one is found. The direct function's
library is remembered in crossent's cache folder (``$CROSSENT_CACHE_DIR``, else
``~/.cache/crossent``): a later process loads it in milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import threading
from collections.abc import Callable

import torch
from torch.fx.experimental import _config as fx_config

from ..errors import InputError, UnsupportedError
from . import _blockpool
from ._rules import LOW_PRECISION

__all__ = ["available", "serves", "set_compiled_kernel", "softmax_grad_rows", "takes"]

# the opt-in: set_compiled_kernel's, else (None) the environment's, read at first use
_enabled: bool | None = None
SERVED = (*LOW_PRECISION, torch.float32)  # the logits' dtypes it takes (float32 inside)
ENVIRONMENT = "CROSSENT_COMPILED_KERNEL"


def _opted_in() -> bool:
    """:func:`set_compiled_kernel`'s setting, else ``$CROSSENT_COMPILED_KERNEL`` (``"1"``
    on; ``"0"`` or unset off), read once: the opt-in for code that cannot call crossent
    (a training script run by a launcher, the Hugging Face ``Trainer``)."""
    global _enabled
    if _enabled is None:
        value = os.environ.get(ENVIRONMENT, "")
        if value not in ("", "0", "1"):
            raise InputError(f"{ENVIRONMENT}={value!r} must be 0 or 1 (or unset)")
        if value == "1" and not available():
            raise UnsupportedError(f"{ENVIRONMENT}=1: the compiled kernel needs a C++ "
                                   f"compiler for torch's inductor (g++ or clang++ on PATH)")
        _enabled = value == "1"
    return _enabled


def set_compiled_kernel(enabled: bool) -> bool:
    """Opt in (``True``) or out of the compiled kernel for bfloat16, float16 and float32
    CPU logits; returns the previous setting. Off by default: the first call per dtype
    compiles for 5-25 s. The compiled library is remembered (``$CROSSENT_CACHE_DIR``, else
    ``~/.cache/crossent``): later processes on the machine load it in milliseconds.

    With it on, ``crossent.torch.cross_entropy`` and the linear head run those CPU logits
    with index targets and neither label smoothing, ``z_loss``, ``softcap`` nor
    ``statistics=`` through :func:`softmax_grad_rows` where the row-block kernel runs:
    under ``backend="auto"`` from ``2**19`` logits in rows of 64 classes or more (smaller
    inputs and fewer classes keep torch's kernel or the small-batch one), and under
    ``backend="rowblock"`` at every size; float64 and everything else keep the row-block
    kernel. Needs a C++ compiler
    (:func:`available`), else :class:`crossent.UnsupportedError`. Without a call, the
    environment variable ``CROSSENT_COMPILED_KERNEL=1`` opts in (read at first use).

    >>> import crossent.torch as xt
    >>> xt.set_compiled_kernel(False)
    False
    """
    global _enabled
    if not isinstance(enabled, bool):
        raise InputError(f"enabled must be True or False, got {enabled!r}")
    if enabled and not available():
        raise UnsupportedError("crossent.torch.set_compiled_kernel(True): needs a C++ "
                               "compiler for torch's inductor (g++ or clang++ on PATH)")
    previous = _enabled if _enabled is not None else os.environ.get(ENVIRONMENT) == "1"
    _enabled = enabled
    return previous


def takes(dtype: torch.dtype, device: torch.device) -> bool:
    """The compiled kernel is on and takes logits of this dtype on this device (the
    entry's routing question; :func:`serves` checks the buffers when the kernel runs)."""
    return device.type == "cpu" and dtype in SERVED and _opted_in()


def serves(z: torch.Tensor, grad: torch.Tensor | None) -> bool:
    """The compiled kernel is on and takes these logits and gradient buffer (the caller
    checks the options: index targets, no smoothing, z-loss, softcap or hooks). A
    negated view (``is_neg``, a lazy sign bit over raw memory the kernel would read as it
    is) goes to the row-block kernel, whose torch operations resolve it."""
    return (grad is not None and z.device.type == "cpu" and _opted_in()
            and z.dtype in SERVED and grad.dtype == z.dtype
            and grad.is_contiguous() and z.is_contiguous()
            and not z.is_neg() and not grad.is_neg())


@functools.cache
def available() -> bool:
    """Whether inductor's CPU backend can compile here (a C++ compiler on ``PATH``)."""
    try:
        from torch._inductor import config
    except ImportError:  # pragma: no cover - torch without inductor
        return False
    cxx = config.cpp.cxx[1] if config.cpp.cxx[1] else "g++"
    return any(shutil.which(name) for name in (cxx, "g++", "c++", "clang++"))


def _scaled_softmax(z: torch.Tensor, k: torch.Tensor, a: torch.Tensor, out: torch.Tensor):
    """The traced body: ``out = (exp(z - k) / s) a`` (rounded once), returns ``s``; a row
    whose ``s`` is past ``_MAX_SUM`` (or NaN) gets its logits written back instead, so that
    even in place (``out`` the same memory as ``z``) it stays intact to be done again."""
    e = torch.exp(z.float() - k.unsqueeze(1))  # named once: kept in a row-local buffer
    s = e.sum(1, keepdim=True)
    # 1 / s >= 2^-64 (rows past _MAX_SUM are redone), so e / s = p keeps its digits;
    # times a last: a / s first would underflow for a tiny a (a class weight of 1e-35)
    # 2.0 ** 64 is _MAX_SUM written out: dynamo makes a global float a graph input
    out.copy_(torch.where(s <= 2.0 ** 64, e * (1.0 / s) * a.unsqueeze(1), z))
    return s.squeeze(1)


def _scaled_softmax_one_thread(z, k, a, out):
    """The same body under its own code object: compiled with one thread (no OpenMP
    region) for :class:`_DirectKernel`, apart from dynamo's cache of the other."""
    return _scaled_softmax(z, k, a, out)


@functools.cache
def _compiled() -> Callable:
    return torch.compile(_scaled_softmax, dynamic=True, fullgraph=True)


@functools.cache
def _compiled_one_thread() -> Callable:
    return torch.compile(_scaled_softmax_one_thread, dynamic=True, fullgraph=True)


# above this s, a / s nears float32's subnormals (a >= 2e-19 stays normal): redo the row
_MAX_SUM = 2.0 ** 64
# most logits per block: a block's call costs 0.1-0.3 ms (dynamo's guards, the overflow
# check). Measured on one thread, 1024 x 32000 bfloat16, x an exp pass, into a reused
# buffer / in place: 2.12 / 2.05 with 1 << 19, 1.53 / 2.16 with 1 << 22, 1.36 / 1.91 with
# 1 << 23. In place each calling thread keeps a scratch block of this size (16 MiB bf16).
_BLOCK_ELEMENTS = 1 << 23
# logits per block of the direct kernel on the block workers (4096 x 32000 bfloat16,
# 2 workers, x an exp pass into a reused buffer / in place with its refill, idle and with
# 2 spinning processes, medians of 5, noisy: 1.47 / 1.77 and 1.48 / 1.69 with 1 << 18,
# 1.44 / 1.76 and 1.41 / 1.67 with 1 << 21, 1.44 / 1.77 and 1.59 / 1.61 with 1 << 23)
_DIRECT_BLOCK_ELEMENTS = 1 << 21
_local = threading.local()  # each thread's in-place scratch block
_compiled_dtypes: set[torch.dtype] = set()
_compile_lock = threading.Lock()


def _renew_compile_lock() -> None:  # a forked child: a thread compiling did not come along
    global _compile_lock
    _compile_lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_compile_lock)
_direct_kernels: dict[torch.dtype, _DirectKernel | None] = {}
_libraries: dict[torch.dtype, str | None] = {}  # found by compiling, in this process


class _DirectKernel:
    """The single-threaded C++ function inductor generated for
    :func:`_scaled_softmax_one_thread`, called through ``ctypes`` with raw pointers.

    Why: the Python binding inductor generates keeps the GIL (so blocks on crossent's
    block workers ran one at a time) and goes through dynamo's guards (0.1-0.3 ms a
    call); a ``ctypes`` call releases the GIL and costs ~2 us, so the rows are shared out
    to the block workers in small blocks, each one single-threaded call: no OpenMP
    barrier waits for a descheduled thread (issue 16, under load).

    The function is found by its library (the one module inductor loaded while compiling)
    and its C signature (read from the generated source next to it); ``probe`` then checks
    the argument order assumed here against the compiled callable on a small input, and
    whether writing the output over the input (``out`` the same memory as ``z``) gives the
    same bits. Anything unexpected: :func:`_direct_kernel` returns None and the compiled
    callable is used as before.
    """

    def __init__(self, function, element_size: int):
        self._function = function
        self._element_size = element_size
        self.inplace = False  # set by probe

    def __call__(self, z: torch.Tensor, k: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
                 out: torch.Tensor, i: int, j: int) -> None:
        """Rows ``i .. j`` (``j - i >= 2``) of contiguous ``z``/``out`` ((M, C), ``C >= 2``)
        and float32 ``k``, ``a``, ``s`` ((M,)); releases the GIL while it runs."""
        row = z.shape[1] * self._element_size
        self._function(z.data_ptr() + i * row, k.data_ptr() + 4 * i, a.data_ptr() + 4 * i,
                       s.data_ptr() + 4 * i, out.data_ptr() + i * row, j - i, z.shape[1])


# the C types of the generated kernel's parameters, in the order :class:`_DirectKernel`
# passes them (z, k, a, s, out, rows, classes)
_C_TYPES = {torch.bfloat16: "at::BFloat16", torch.float16: "at::Half", torch.float32: "float"}


def _expected_signature(dtype: torch.dtype) -> list[str]:
    t = _C_TYPES[dtype]
    return [f"const {t}*", "const float*", "const float*", "float*", f"{t}*",
            "const int64_t", "const int64_t"]


def _signature(source: str) -> list[str] | None:
    """The parameter types of ``extern "C" void kernel(...)`` in a generated source."""
    found = re.findall(r'extern\s+"C"\s+void\s+kernel\s*\(([^)]*)\)', source)
    if len(found) != 1:
        return None
    return [" ".join(param.split()[:-1]) for param in found[0].split(",")]


def _probe_inputs(dtype: torch.dtype):
    """A small input for :func:`_probe`: odd sizes (the vector loops' tails run too), one
    row past ``_MAX_SUM``; ``k`` and ``a`` with room for rows and classes swapped (a wrong
    guess of the parameter order then reads inside its buffers)."""
    rows, classes = 5, 37
    # float32 on the CPU whatever torch's default dtype and device (the kernel's types)
    f32: dict = {"dtype": torch.float32, "device": "cpu"}
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(rows, classes, generator=g, **f32) * 4).to(dtype)
    z[1, 3] = 100.0
    k = torch.zeros(classes, **f32)
    k[:rows] = z[:, 0].float()
    return z, k, torch.rand(classes, generator=g, **f32) + 0.5


def _compile_one_thread(z, k, a, out):
    """``_compiled_one_thread()(...)``, inductor generating code for one thread."""
    from torch._inductor import config

    with (config.patch({"cpp.threads": 1}),
          fx_config.patch(use_duck_shape=False)):  # type: ignore[attr-defined]
        return _compiled_one_thread()(z, k, a, out)


def _find_library(dtype: torch.dtype) -> str | None:
    """Compile the one-thread graph for ``dtype``; the path of the one library inductor
    loaded for it whose generated source declares the expected ``kernel`` (None: none or
    several). Called once per dtype, under ``_compile_lock``."""
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache as bindings
    except ImportError:  # pragma: no cover - another torch layout
        return None
    z, k, a = _probe_inputs(dtype)
    before = set(getattr(bindings, "_loaded_module_names", ()))
    _compile_one_thread(z, k[: z.shape[0]], a[: z.shape[0]], torch.empty_like(z))
    found = [path for name in set(getattr(bindings, "_loaded_module_names", ())) - before
             if _declares_kernel(path := getattr(sys.modules.get(name), "__file__", "") or "",
                                 dtype)]
    return found[0] if len(found) == 1 else None


def _declares_kernel(path: str, dtype: torch.dtype) -> bool:
    """``path`` is a library whose generated source (beside it) declares the ``kernel``
    :class:`_DirectKernel` calls for ``dtype``."""
    if not path.endswith(".so") or not os.path.isfile(path):
        return False
    try:
        with open(path[:-3] + ".cpp", encoding="utf-8") as source:
            return _signature(source.read(1 << 22)) == _expected_signature(dtype)
    except (OSError, ValueError):  # missing, unreadable, not text
        return False


def _probe(kernel: _DirectKernel, dtype: torch.dtype) -> bool:
    """Whether ``kernel`` computes :func:`_scaled_softmax` on :func:`_probe_inputs` (eager
    torch, within a rounding: a wrong parameter order is far off) in two blocks, writing
    nothing outside its rows; sets ``kernel.inplace``: the same bits with the output
    written over the input."""
    z, k, a = _probe_inputs(dtype)
    rows, classes = z.shape
    out_ref = torch.empty_like(z)
    s_ref = _scaled_softmax(z, k[:rows], a[:rows], out_ref)
    s = torch.full((classes,), -1.0, dtype=torch.float32, device="cpu")
    out = torch.zeros(classes * classes, dtype=dtype, device="cpu")
    mine = out[: rows * classes].view(rows, classes)
    for i, j in ((0, 2), (2, rows)):  # two blocks: the offsets of rows past the first
        kernel(z, k, a, s, mine, i, j)
    # a rounding apart (exp's last bits differ); a wrong order is off by far more
    tol = 2 * torch.finfo(dtype).eps + 1e-6
    if not (torch.allclose(s[:rows], s_ref, rtol=1e-5, atol=0)
            and torch.allclose(mine.float(), out_ref.float(), rtol=tol, atol=0)
            and bool((s[rows:] == -1).all()) and bool((out[rows * classes:] == 0).all())):
        return False
    same, s_same = z.clone(), s.clone()
    for i, j in ((0, 2), (2, rows)):
        kernel(same, k, a, s_same, same, i, j)
    kernel.inplace = torch.equal(same, mine) and torch.equal(s_same, s)
    return True


# A found library is remembered (its path, in crossent's cache directory), per Python, torch,
# dtype and CPU (its feature flags: the library was built for this CPU's vector ISA): a new
# process loads it in milliseconds instead of compiling (4-5 s from inductor's caches, 10-25 s
# cold), without importing inductor. A library since removed (inductor's cache cleared) is
# compiled again.
def _cache_dir() -> str:
    """``$CROSSENT_CACHE_DIR``, else ``$XDG_CACHE_HOME/crossent``, else ``~/.cache/crossent``."""
    if os.environ.get("CROSSENT_CACHE_DIR"):
        return os.environ["CROSSENT_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "crossent")


@functools.cache
def _cpu_key() -> str:
    """This CPU's feature flags (``/proc/cpuinfo``) hashed, else the machine's name."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    text = " ".join(sorted(flags.split(":", 1)[-1].split())) or platform.processor()
    return f"{platform.machine()}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


@functools.cache
def _body_key() -> str:
    """A hash of the traced body (its bytecode and constants, ``_MAX_SUM`` included): a
    library generated from another body is never taken for this one."""
    code = _scaled_softmax.__code__
    text = repr((code.co_code, code.co_consts, code.co_names, _MAX_SUM))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _index_path(dtype: torch.dtype) -> str:
    key = (f"py{sys.version_info[0]}.{sys.version_info[1]}-torch{torch.__version__}-"
           f"{str(dtype).split('.')[-1]}-{_cpu_key()}-{_body_key()}")
    return os.path.join(_cache_dir(), "direct-kernel-" + re.sub(r"[^\w.+-]", "_", key))


def _digest(path: str) -> str:
    with open(path, "rb") as library:
        return hashlib.sha256(library.read()).hexdigest()


def _private(path: str) -> bool:
    """Owned by this user and writable by no one else (a library another user could swap
    would run its code here; the probe only checks the numbers, after loading)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return False
    getuid = getattr(os, "getuid", None)
    return (getuid is None or st.st_uid == getuid()) and not st.st_mode & 0o022


def _remembered(dtype: torch.dtype) -> str | None:
    """The library the index names, if the index and the library are this user's own, the
    library is the one written down (size and SHA-256: not truncated or replaced) and
    declares the kernel; else None (compile again). A damaged index is ignored."""
    index = _index_path(dtype)
    try:
        with open(index, encoding="utf-8") as f:
            entry = json.loads(f.read(1 << 16))
        path, size, digest = entry["library"], entry["size"], entry["sha256"]
        if not (isinstance(path, str) and _private(index) and _private(path)
                and os.path.getsize(path) == size and _digest(path) == digest):
            return None
    except (OSError, ValueError, KeyError, TypeError):  # missing, not JSON, not text
        return None
    return path if _declares_kernel(path, dtype) else None


def _remember(dtype: torch.dtype, path: str) -> None:
    """Write the index atomically (a concurrent process reads the old one or the new);
    nothing is left behind where that fails (a read-only cache: compile next time)."""
    index = _index_path(dtype)
    partial = f"{index}.{os.getpid()}.{threading.get_ident()}"
    try:
        entry = {"library": path, "size": os.path.getsize(path), "sha256": _digest(path)}
        os.makedirs(os.path.dirname(index), exist_ok=True)
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(entry, f)
        os.chmod(partial, 0o644)
        os.replace(partial, index)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(partial)


def _wrap(path: str, dtype: torch.dtype) -> _DirectKernel | None:
    """The ``kernel`` of library ``path`` for ``dtype``, probed (None: not as expected)."""
    try:
        function = ctypes.CDLL(path).kernel  # CDLL, not PyDLL: calls release the GIL
    except (OSError, AttributeError):
        return None
    function.restype = None
    function.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2
    kernel = _DirectKernel(function, torch.empty((), dtype=dtype, device="cpu").element_size())
    return kernel if _probe(kernel, dtype) else None


def _load_direct(dtype: torch.dtype) -> _DirectKernel | None:
    """The direct kernel for ``dtype`` (None: not found, or not as expected): the library
    remembered on disk, else the one found earlier in this process (dynamo compiles a graph
    once per process), else compiled now; remembered on disk for the next process."""
    remembered = _remembered(dtype)
    for path in (remembered, _libraries.get(dtype)):
        kernel = None if path is None else _wrap(path, dtype)
        if kernel is not None:
            break
    else:
        path = _libraries[dtype] = _find_library(dtype)
        kernel = None if path is None else _wrap(path, dtype)
    if kernel is not None and path is not None and path != remembered:
        _remember(dtype, path)
    return kernel


def _direct_kernel(dtype: torch.dtype) -> _DirectKernel | None:
    """The direct kernel for ``dtype`` (compiled on first use), or None where it cannot be
    used: the block workers are off (one thread would run it all), or it was not found."""
    if not _blockpool.workers_enabled():
        return None
    if dtype not in _direct_kernels:
        with _compile_lock:
            if dtype not in _direct_kernels:
                _direct_kernels[dtype] = _load_direct(dtype)
    return _direct_kernels[dtype]


def _scaled(z: torch.Tensor, k: torch.Tensor, a: torch.Tensor, out: torch.Tensor):
    """``_scaled_softmax`` compiled; eager for one row or one class (dynamic shapes still
    specialise sizes 0 and 1: a second compilation would cost more than the call)."""
    with torch.no_grad():
        if min(z.shape) <= 1:
            return _scaled_softmax(z, k, a, out)
        return _compiled()(z, k, a, out)


def _compile(z: torch.Tensor, k: torch.Tensor, a: torch.Tensor, out: torch.Tensor):
    """:func:`_scaled`, compiling: without "duck" sizes (rows of a view and of its base
    being equal once is no guard), one caller at a time (concurrent first calls compile
    once, not once each)."""
    with _compile_lock, fx_config.patch(use_duck_shape=False):  # type: ignore[attr-defined]
        result = _scaled(z, k, a, out)
        if min(z.shape) > 1:
            _compiled_dtypes.add(z.dtype)
        return result


def _scaled_rows(z: torch.Tensor, k: torch.Tensor, a: torch.Tensor, out: torch.Tensor
                 ) -> torch.Tensor:
    """``out = a * exp(z - k) / s`` (``out is z`` allowed) for every row; returns ``s``.
    Rows whose ``s`` exceeds ``_MAX_SUM`` (or is NaN) keep their logits in ``out``; the
    caller redoes them."""
    num_rows, num_classes = z.shape
    inplace = out.data_ptr() == z.data_ptr()
    s = torch.empty(num_rows, dtype=torch.float32, device=z.device)
    kernel = _direct_kernel(z.dtype) if min(z.shape) > 1 else None
    if kernel is not None and (kernel.inplace or not inplace) and _direct_types(z, k, a, out):
        # blocks of >= 2 rows (the graph was compiled for sizes >= 2; the last block
        # takes an odd last row), and a batch under a block still shared out to the workers
        step = max(2, min(_DIRECT_BLOCK_ELEMENTS // num_classes,
                          -(-num_rows // torch.get_num_threads())))
        _blockpool.run_row_blocks(lambda i, j: kernel(z, k, a, s, out, i, j), num_rows,
                                  step, z.device, min_rows=2)
        return s
    _scaled_blocks(z, k, a, out, s, inplace)
    return s


def _direct_types(z, k, a, out) -> bool:
    """What the C function reads and writes through raw pointers is what it was compiled
    for: contiguous CPU tensors, ``k`` and ``a`` float32 (M,), ``out`` as ``z``."""
    rows = z.shape[0]
    return (z.device.type == out.device.type == k.device.type == a.device.type == "cpu"
            and k.dtype == a.dtype == torch.float32 and out.dtype == z.dtype
            and k.shape == a.shape == (rows,) and out.shape == z.shape
            and all(t.is_contiguous() for t in (z, k, a, out)))


def _scaled_blocks(z, k, a, out, s, inplace: bool) -> None:
    """:func:`_scaled_rows` through the compiled callable, block by block in the calling
    thread (each block on torch's OpenMP threads: the callable keeps the GIL, so on
    crossent's block workers blocks ran one at a time: measured, 4096 x 32000 bfloat16,
    2 threads, 3.1x an exp pass on the workers, 1.5x here).

    In place, each block goes through a reused per-thread scratch block and is copied
    back: inductor 2.13 fails (KeyError in its row-local buffer pass) on a graph that
    overwrites its own input."""
    num_rows, num_classes = z.shape
    rows = max(2, _BLOCK_ELEMENTS // max(num_classes, 1))
    key = (rows, num_classes, z.dtype, z.device)
    for i in range(0, num_rows, rows):
        j = min(i + rows, num_rows)
        # compiling (under the lock) until a block has compiled this dtype
        run = _scaled if z.dtype in _compiled_dtypes else _compile
        if inplace:
            if getattr(_local, "key", None) != key:
                _local.key = None  # the old block is freed before the new one is made
                _local.block = torch.empty((rows, num_classes), dtype=z.dtype,
                                           device=z.device)
                _local.key = key
            dest = _local.block[: j - i]
        else:
            dest = out[i:j]
        s[i:j] = run(z[i:j], k[i:j], a[i:j], dest)
        if inplace:
            out[i:j].copy_(dest)


def _redo_with_max(z: torch.Tensor, k: torch.Tensor, a: torch.Tensor, out: torch.Tensor,
                   s: torch.Tensor) -> None:
    """Rows whose ``s`` is past ``_MAX_SUM`` (some ``z_c - z_y > 44``) or NaN (NaN or
    infinite logits) again, shifted by their max (``s <= C``); their logits are still in
    ``z`` (``out`` wrote them back in place). A row whose ``s`` is still NaN gets NaN, as
    torch's softmax."""
    bad = ~(s <= _MAX_SUM)
    if not bool(bad.any()):  # one host sync per batch
        return
    idx = bad.nonzero().squeeze(1)
    redo = z[idx]  # a copy, intact (written back in place)
    k_max = redo.float().amax(1)
    g = torch.empty_like(redo)
    s_redo = _scaled_rows(redo, k_max, a[idx], g)
    g[~(s_redo <= _MAX_SUM)] = math.nan
    s[idx] = s_redo
    k[idx] = k_max
    out[idx] = g


def softmax_grad_rows(z: torch.Tensor, y: torch.Tensor, a: torch.Tensor, c: torch.Tensor,
                      out: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad, lse, nll)`` of a batch of rows (see the module docstring for the formula).

    ``z``: (M, C) float32/bfloat16/float16 CPU logits, contiguous; ``y``: (M,) int64 class
    ids in ``[0, C)`` (ignored rows: any valid id, with ``a == c == 0``); ``a``, ``c``:
    (M,) float32. ``out`` ((M, C), z's dtype, contiguous; ``out is z`` allowed: the
    logits are then overwritten) receives the gradient, else a new tensor does. ``lse``
    and ``nll = lse - z[n, y_n]`` are float32 (M,); ``nll`` is ``log s`` itself where the
    shift is ``z_y``: no cancellation (a confident row's loss keeps its digits).
    """
    num_rows, num_classes = z.shape
    rows = torch.arange(num_rows, device=z.device)
    z_y = z[rows, y].float()  # before ``out is z`` overwrites it
    a, c = a.float().contiguous(), c.float().contiguous()
    if out is None:
        out = torch.empty_like(z)
    k = z_y.clone()  # the shift: max_c z_c instead where this one overflows
    s = _scaled_rows(z, k, a, out)
    _redo_with_max(z, k, a, out, s)
    # the true class: a p_y + c in float32, rounded once (PITFALLS 6); NaN where the
    # row's softmax is, even with a = 0 (an ignored row), as in torch
    g_y = torch.exp(z_y - k) / s * a + c
    out.view(-1).index_put_((rows * num_classes + y,), g_y.to(out.dtype))
    log_s = s.log()
    return out, k + log_s, (k - z_y) + log_s
