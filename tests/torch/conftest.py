"""crossent.torch tests exercise the fused kernel at every size and class count: small
inputs, and CPU rows of few classes, would otherwise go to torch's own kernel or the
small-batch kernel (see ``_backends.NATIVE_MAX_LOGITS``, ``_backends.FEW_CLASSES``), and
the tests would compare torch with itself. Tests marked ``native_dispatch`` keep the
dispatch."""

from __future__ import annotations

import pytest

import crossent.torch as xt
from crossent.torch import _backends


@pytest.fixture(autouse=True)
def _fused_kernel_at_every_size(request, monkeypatch):
    if request.node.get_closest_marker("native_dispatch") is None:
        monkeypatch.setattr(_backends, "NATIVE_MAX_LOGITS", 0)
        for few in ("SMALL_MAX_LOGITS", "SMALL_MAX_LOGITS_FLOAT32", "FEW_CLASSES",
                    "FEW_CLASSES_NATIVE", "FEW_CLASSES_PROBABILITIES", "SPATIAL_FEW_CLASSES"):
            monkeypatch.setattr(_backends, few, 0)


@pytest.fixture
def fresh_pool():
    """For the buffer-pool tests: buffer reuse on and an empty pool for one test; the
    previous setting restored after."""
    previous = xt.set_buffer_reuse(True)
    xt.empty_cache()
    yield
    xt.empty_cache()
    xt.set_buffer_reuse(previous)


@pytest.fixture
def workers():
    """For the block-worker tests: workers on, two threads at least; the thread count and
    the setting restored afterwards."""
    import torch

    from crossent.torch import _blockpool

    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    yield
    _blockpool.set_block_workers(True)
    torch.set_num_threads(threads)


@pytest.fixture
def checked_calls(monkeypatch):
    """Counts the calls of ``crossent.torch.cross_entropy`` that reach its checked path
    (``make_options``): empty after a call the small-input fast path served."""
    from crossent.torch import _cross_entropy

    calls = []
    real = _cross_entropy.make_options

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_cross_entropy, "make_options", spy)
    return calls


@pytest.fixture
def routes(monkeypatch):
    """The routes ``_backends.choose_backend`` returned, in order (a spy)."""
    seen = []
    real = _backends.choose_backend

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(_backends, "choose_backend", spy)
    return seen


@pytest.fixture
def compiled_calls(monkeypatch):
    """``crossent.torch.set_compiled_kernel(True)`` for one test; the shapes of the logits
    the compiled kernel (``_inductor.softmax_grad_rows``) was called on, in order."""
    from crossent.torch import _inductor

    calls = []
    real = _inductor.softmax_grad_rows

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(_inductor, "softmax_grad_rows", spy)
    previous = xt.set_compiled_kernel(True)
    yield calls
    xt.set_compiled_kernel(previous)
