"""Reused gradient buffers for the fused kernels on CPU.

Why: the fused cross-entropy writes an ``N x C`` gradient during the forward pass. On CPU
a fresh buffer of that size comes from ``mmap`` and every page is faulted in and zeroed by
the kernel on first write; at N=4096, C=32000 (500 MiB) that costs about twice the whole
fused kernel. A training loop asks for the same shape every step, so the buffer of the
previous step is handed out again once nobody else can see it.

The rule (all must hold, checked under a lock each time a buffer is considered):

- the storage's use count is 1 (only this pool): no tensor, view, ``.grad`` or
  autograd graph holds it, and no Python object holds the storage itself;
- it is not shared memory (``storage.is_shared()``): ``torch.multiprocessing`` pickling
  (``mp.Queue``, ``Pool``) and ``Module.share_memory()`` / ``share_memory_()`` move a
  storage into shared memory *in place*, where other processes keep seeing it after
  every local reference is gone. Use count 1 does not prove that nobody else sees it;
- its identity is what the pool allocated: the same data pointer and byte size (a
  storage resized, swapped into shared memory or otherwise re-pointed is not ours any
  more).

A buffer that fails the last two checks is dropped from the pool for good (it belongs
to whoever shared or resized it). A buffer still in use (the previous step's ``.grad``
kept, two losses in one step, a retained graph) is never handed out; a new one is
allocated instead. On CUDA the caching allocator already reuses memory, so buffers are
only pooled on CPU. Cost of the checks: a few microseconds per fused call (measured in
``benchmarks/pool_cost.py``).

Between steps the pool keeps at most :data:`_CAPACITY` buffers alive (the memory the
next step needs anyway); a free buffer smaller than a new request is dropped, so growing
sizes do not pile up. :func:`empty_cache` drops them; :func:`set_buffer_reuse` turns
pooling off.
"""

from __future__ import annotations

import math
import sys
import threading

import torch

from ..errors import InputError

__all__ = ["empty", "empty_cache", "set_buffer_reuse"]

_CAPACITY = 4  # a linear head takes three: its logits chunk, dW and dx
_lock = threading.Lock()
_pool: list[_Entry] = []
_enabled = True
_use_count = getattr(torch._C, "_storage_Use_Count", None)


class _Entry:
    """A pooled storage and the identity it had when the pool allocated it."""

    __slots__ = ("nbytes", "ptr", "storage")

    def __init__(self, storage: torch.UntypedStorage) -> None:
        self.storage, self.ptr, self.nbytes = storage, storage.data_ptr(), storage.nbytes()


def _holders(entry: _Entry) -> int:
    return sys.getrefcount(entry.storage)


def _intact(entry: _Entry) -> bool:
    """Still the private memory the pool allocated: not moved into shared memory (where
    another process may see it), not resized, not re-pointed."""
    storage = entry.storage
    return (not storage.is_shared() and storage.data_ptr() == entry.ptr
            and storage.nbytes() == entry.nbytes)


def _free(entry: _Entry) -> bool:
    """Nobody but the pool can see the storage: tensors and views show in its use count,
    Python holders of the storage object itself (a kept ``x.untyped_storage()``) only in
    its reference count, other processes in its being shared (see the module doc)."""
    return (_use_count is not None and _use_count(entry.storage._cdata) == 1
            and _holders(entry) <= _POOL_HOLDERS and _intact(entry))


def _via_free(entry: _Entry) -> int:
    return _holders(entry)  # the same frames as _free


def _calibrate() -> int:
    """The references :func:`_free` sees when only the pool holds a storage (the entry,
    call arguments: how many count depends on the Python version, so it is measured here
    rather than assumed)."""
    pool = [_Entry(torch.UntypedStorage(0))]
    (holders,) = [_via_free(e) for e in pool]  # scanned as empty() scans
    return holders


_POOL_HOLDERS = _calibrate()


def _poolable(like: torch.Tensor) -> bool:
    # exact type: fake/functional tensors of torch.compile and other subclasses allocate
    # the ordinary way
    return (_enabled and _use_count is not None and like.device.type == "cpu"
            and type(like) is torch.Tensor)


def empty(shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor on ``like``'s device, from the pool where possible.

    A free buffer is reused if it holds the request and at most twice it (a small
    gradient kept as ``.grad`` must not pin a large buffer)."""
    if not _poolable(like):
        return torch.empty(shape, dtype=dtype, device=like.device)
    nbytes = math.prod(shape) * dtype.itemsize
    strides = [math.prod(shape[k + 1:]) for k in range(len(shape))]  # contiguous
    with _lock:  # until the tensor exists: it is what makes the buffer busy
        # shared, resized or re-pointed storages are someone else's now: forget them
        _pool[:] = [e for e in _pool if _intact(e)]
        fits = [e for e in _pool if nbytes <= e.nbytes <= 2 * nbytes and _free(e)]
        if fits:
            chosen = min(fits, key=lambda e: e.nbytes).storage
        else:
            chosen = torch.UntypedStorage(nbytes, device=like.device)
            # free buffers too small for this request are superseded (sizes that grow step
            # by step must not pile up); beyond capacity the oldest go (a busy one lives on
            # with its user)
            _pool[:] = [_Entry(chosen)] + [e for e in _pool
                                           if e.nbytes >= nbytes or not _free(e)]
            del _pool[_CAPACITY:]
        return torch.empty(0, dtype=dtype, device=like.device).set_(chosen, 0, shape, strides)


def empty_cache() -> None:
    """Release the gradient buffers kept for reuse (CPU); buffers in use are unaffected.

    >>> empty_cache()
    """
    with _lock:
        _pool.clear()


def set_buffer_reuse(enabled: bool) -> bool:
    """Turn reuse of CPU gradient buffers on or off; returns the previous setting.

    Off, every fused call allocates fresh buffers (slower on CPU: page faults) and keeps
    nothing between calls.

    >>> previous = set_buffer_reuse(False)
    >>> set_buffer_reuse(previous)
    False
    """
    if not isinstance(enabled, bool):  # bool("no") is True: refused, as its siblings do
        raise InputError(f"set_buffer_reuse(enabled={enabled!r}): enabled must be True or "
                         f"False")
    global _enabled
    with _lock:
        previous, _enabled = _enabled, enabled
        if not _enabled:
            _pool.clear()
    return previous
