"""Run the Triton kernels in triton's CPU interpreter when no CUDA device is present.

``triton.jit`` picks the interpreter when it is applied, reading ``TRITON_INTERPRET``,
and triton's own library functions (``tl.sum``, ``tl.zeros``, ...) are jitted when
triton is imported. By the time pytest reaches this folder triton has usually been
imported already, in compiled mode (``import torch._dynamo``, run by
``import crossent.torch``, imports it). So, for the tests of this folder only, the
fixture below sets the variable and swaps the loaded triton's Python modules in
``sys.modules`` for freshly imported, interpreted ones (its C extension stays: extension
modules are initialised once per process); afterwards it puts the original modules and
the variable back, so tests that run later (``torch.compile``) see the triton they knew.
crossent's kernels are decorated on first launch against whichever triton is current
(``crossent.torch._triton.kernels.compiled``). With CUDA present nothing is changed: the
kernels compile for the GPU.

With two sets of triton's Python modules alive, nanobind (triton's binding library)
prints hundreds of "leaked function ..." lines when the interpreter finalises, after
pytest's summary line, where they would bury it. So once the swap has happened the process
ends with ``os._exit`` and pytest's own exit status, after pytest has unconfigured and
flushed its output (the last hook to run).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = not torch.cuda.is_available()

if not HAVE_TRITON:
    collect_ignore_glob = ["test_*.py"]


def _python_triton_modules() -> dict[str, object]:
    return {name: mod for name, mod in sys.modules.items()
            if (name == "triton" or name.startswith("triton."))
            and not name.startswith("triton._C")}


def _interpreted_triton_loaded() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(sys.modules["triton.language.standard"].zeros, InterpretedFunction)


_SWAPPED = False
_EXIT_STATUS = 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _EXIT_STATUS
    _EXIT_STATUS = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _SWAPPED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS)


@pytest.fixture(scope="module", autouse=True)
def _triton_interpreter():
    global _SWAPPED
    if not (HAVE_TRITON and INTERPRET):
        yield
        return
    saved_env = os.environ.get("TRITON_INTERPRET")
    # asked before the snapshot: the question imports triton.runtime.interpreter, which
    # must go with the rest of the compiled-mode modules
    switch = "triton" in sys.modules and not _interpreted_triton_loaded()
    saved = _python_triton_modules()
    os.environ["TRITON_INTERPRET"] = "1"
    if switch:
        _SWAPPED = True
        for name in saved:
            del sys.modules[name]
    importlib.import_module("triton")
    assert _interpreted_triton_loaded(), "triton did not switch to its interpreter"
    try:
        yield
    finally:
        if saved:
            for name in _python_triton_modules():
                del sys.modules[name]
            sys.modules.update(saved)
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
