"""Reused gradient buffers for the fused kernels on CPU.

Why: the fused cross-entropy writes an ``N x C`` gradient during the forward pass. On CPU
a fresh buffer of that size comes from ``mmap`` and every page is faulted in and zeroed by
the kernel on first write; at N=4096, C=32000 (500 MiB) that costs about twice the whole
fused kernel. A training loop asks for the same shape every step, so the buffer of the
previous step is handed out again once nothing references it any more.

"Nothing references it" is the storage's use count being 1 (only this pool): autograd
has consumed the gradient, no ``.grad`` holds it, no view of it is alive. A buffer still
in use (the previous step's ``.grad`` kept, two losses in one step, a retained graph) is
never handed out; a new one is allocated instead. On CUDA the caching allocator already
reuses memory, so buffers are only pooled on CPU.

The cost: between steps the pool keeps at most :data:`_CAPACITY` buffers alive (the
memory the next step needs anyway); a free buffer smaller than a new request is dropped,
so growing sizes do not pile up. :func:`empty_cache` drops them;
:func:`set_buffer_reuse` turns pooling off.
"""

from __future__ import annotations

import math
import sys
import threading

import torch

__all__ = ["empty", "empty_cache", "set_buffer_reuse"]

_CAPACITY = 4  # a linear head takes three: its logits chunk, dW and dx
_lock = threading.Lock()
_pool: list[torch.UntypedStorage] = []
_enabled = True
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _holders(storage: torch.UntypedStorage) -> int:
    return sys.getrefcount(storage)


def _free(storage: torch.UntypedStorage) -> bool:
    """Nothing but the pool holds ``storage``: tensors and views show in its use count,
    Python holders of the storage object itself (a kept ``x.untyped_storage()``) only in
    its reference count."""
    return (_use_count is not None and _use_count(storage._cdata) == 1
            and _holders(storage) <= _POOL_HOLDERS)


def _via_free(storage: torch.UntypedStorage) -> int:
    return _holders(storage)  # the same frames as _free


def _calibrate() -> int:
    """The references :func:`_free` sees when only the pool holds a storage (the list entry,
    the scan's loop variable, call arguments: how many count depends on the Python
    version, so it is measured here rather than assumed)."""
    pool = [torch.UntypedStorage(0)]
    (holders,) = [_via_free(s) for s in pool]  # scanned as empty() scans
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
        fits = [s for s in _pool if nbytes <= s.nbytes() <= 2 * nbytes and _free(s)]
        if fits:
            chosen = min(fits, key=lambda s: s.nbytes())
        else:
            chosen = torch.UntypedStorage(nbytes, device=like.device)
            # free buffers too small for this request are superseded (sizes that grow step
            # by step must not pile up); beyond capacity the oldest go (a busy one lives on
            # with its user)
            _pool[:] = [chosen] + [s for s in _pool if s.nbytes() >= nbytes or not _free(s)]
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
    global _enabled
    with _lock:
        previous, _enabled = _enabled, bool(enabled)
        if not _enabled:
            _pool.clear()
    return previous
