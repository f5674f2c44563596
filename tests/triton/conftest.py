"""Run the Triton kernels in triton's CPU interpreter when no CUDA device is present.

``triton.jit`` picks the interpreter when it is applied, reading ``TRITON_INTERPRET``, and
triton's own library functions (``tl.sum``, ``tl.zeros``, ...) are jitted when triton is
imported. By the time pytest reaches this folder triton has usually been imported already,
in compiled mode (``import torch._dynamo``, run by ``import crossent.torch``, imports it).
So, for the tests of this folder only, the fixture below sets the variable and swaps the
loaded triton's Python modules in ``sys.modules`` for interpreted ones (imported for the
first module, the same ones put back for the next; its C extension stays: extension
modules are initialised once per process); afterwards it puts the original modules and the
variable back, so tests that run later (``torch.compile``) see the triton they knew.
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
import inspect
import os
import pathlib
import subprocess
import sys
import threading
import time
from typing import Any

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


_FAST_INTERPRETERS: set[int] = set()
# the interpreted triton's Python modules, put back for each test module of this folder:
# imported afresh per module, triton and crossent's kernels (decorated per triton module,
# kernels.compiled) would be imported, decorated and rewritten again each time (about
# 0.3 s a module)
_INTERPRETED: dict[str, object] = {}


def _patch_lang_once_per_launch(interpreter: Any) -> None:
    """Speeds up triton's interpreter (a third of the time of a kernel that calls jitted
    helpers per tile, as crossent's do) without changing what it runs: a launch
    (``GridExecutor.__call__``) patches ``triton.language`` into interpreted mode for its
    kernel (``_patch_lang``, restored when the launch ends), and every call of a jitted
    function inside it patches the same modules again (``InterpretedFunction.__call__``,
    never restored), walking every member of the language modules each time. Within a
    launch this skips a call's patch when the language modules its function sees are ones
    this launch has patched already (the patch would set the same interpreted members);
    the first call seeing another one (``triton.language.core``, from triton's own
    helpers) is patched as before. Left as it is where the interpreter lacks these
    names."""
    grid = getattr(interpreter, "GridExecutor", None)
    patch = getattr(interpreter, "_patch_lang", None)
    tl = getattr(interpreter, "tl", None)
    if id(interpreter) in _FAST_INTERPRETERS or None in (grid, patch, tl):
        return
    _FAST_INTERPRETERS.add(id(interpreter))
    launch = grid.__call__
    state = threading.local()

    class _Nothing:
        def restore(self) -> None:
            pass

    every = {id(tl), id(tl.core)}  # the only language modules a patch looks for

    def patch_lang(fn: Any) -> Any:
        patched = getattr(state, "langs", None)
        if patched is None:  # not inside a launch
            return patch(fn)
        if patched == every:  # both patched: whatever fn sees (without scanning it)
            return _Nothing()
        langs = {id(v) for v in fn.__globals__.values()
                 if inspect.ismodule(v) and v in (tl, tl.core)}
        if langs <= patched:
            return _Nothing()
        patched |= langs
        return patch(fn)

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        state.langs = set()
        try:
            return launch(self, *args, **kwargs)
        finally:
            state.langs = None

    interpreter._patch_lang = patch_lang
    grid.__call__ = call


def _memoize_np_dtype(interpreter: Any) -> None:
    """Speeds up triton's interpreter without changing what it runs: its
    ``_get_np_dtype(tt_dtype)``, called for nearly every tile operation, builds a dict of
    triton's 19 scalar types (hashing each) on every call, to look one up. Here each answer
    is remembered by the type's class and name (a triton type's name spells it out:
    ``fp32``, ``pointer<fp32>``, ``<(16,), fp32>``) and the element's class; the rest,
    unnamed or failing types, go to triton's function as before."""
    get = getattr(interpreter, "_get_np_dtype", None)
    if get is None or getattr(get, "remembers", False):
        return
    memo: dict[tuple[Any, ...], Any] = {}

    def get_np_dtype(tt_dtype: Any) -> Any:
        name = getattr(tt_dtype, "name", None)
        if not isinstance(name, str):
            return get(tt_dtype)
        key = (type(tt_dtype), name, type(getattr(tt_dtype, "element_ty", None)))
        found = memo.get(key)
        if found is None:
            found = memo[key] = get(tt_dtype)
        return found

    get_np_dtype.remembers = True  # type: ignore[attr-defined]
    interpreter._get_np_dtype = get_np_dtype


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
        sys.modules.update(_INTERPRETED)  # the previous module's, if any: jitted once
    importlib.import_module("triton")
    assert _interpreted_triton_loaded(), "triton did not switch to its interpreter"
    interpreter = importlib.import_module("triton.runtime.interpreter")
    _patch_lang_once_per_launch(interpreter)
    _memoize_np_dtype(interpreter)
    try:
        yield
    finally:
        if saved:
            current = _python_triton_modules()
            if switch:
                _INTERPRETED.clear()
                _INTERPRETED.update(current)
            for name in current:
                del sys.modules[name]
            sys.modules.update(saved)
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env



# ------------------------------------------------ processes started with the first test
#
# Two kinds of test here wait on other processes: the sm_90 compile checks (one
# ``compile_for_gpu.py`` process for the three of them) and the gloo-rank run (spawned CPU
# processes, each importing torch and triton). Both are started by the first test of this
# folder and run beside the other tests (on a second core, where there is one); the tests
# that need them wait for their outcome, each bounded in time (a hang fails the test).
# They run at a lower priority than this process (CHILD_NICENESS): on two cores, this
# process's tests are the run's critical path, and the four children (three gloo ranks and
# the compiler) would otherwise take part of its core; they finish well before the tests
# that wait for them.

_STARTED: dict[str, Any] = {}
CHILD_NICENESS = 10  # added to this process's nice value (capped at 19 by the system)


def _lower_priority(pid: int) -> None:
    """``pid`` (a process just started, one thread so far: its later threads inherit)
    at CHILD_NICENESS above this process; left as it is where that is not possible."""
    try:
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, pid, min(19, mine + CHILD_NICENESS))
    except (AttributeError, OSError):  # no such call on this system, or it has ended
        pass


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "gloo_group(fn, world, timeout): the test's gloo run, fn(rank, world) on "
        "world spawned CPU processes (dist_harness's entry), started with the first test "
        "of tests/triton; the test waits for it with the gloo_group fixture")


def _nvidia_backend() -> bool:
    import triton.backends

    return "nvidia" in triton.backends.backends


def _start_sm90_compile() -> subprocess.Popen[str]:
    script = pathlib.Path(__file__).with_name("compile_for_gpu.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    _lower_priority(proc.pid)
    return proc


class _GlooRun:
    """``fn(rank, world)`` on ``world`` spawned processes joined to a gloo group (the entry
    of tests/torch/distributed/dist_harness.py), started now (the children inherit
    ``TRITON_INTERPRET=1``: they run the kernels in the interpreter) and waited for by
    :meth:`wait` within ``timeout`` seconds of the start."""

    def __init__(self, fn: Any, world: int, timeout: float) -> None:
        import torch.multiprocessing as mp

        sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "torch" / "distributed"))
        from dist_harness import _entry, free_port

        self.name, self.world, self.timeout = fn.__name__, world, timeout
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            self.ctx = mp.start_processes(_entry, args=(world, free_port(), fn, ()),
                                          nprocs=world, join=False, start_method="spawn")
            for proc in self.ctx.processes:
                _lower_priority(proc.pid)
        finally:
            if saved is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved
        self.deadline = time.monotonic() + timeout

    def wait(self) -> None:
        """Returns when every child has finished; re-raises a child's exception (its
        traceback in the message); TimeoutError past the deadline, the children killed."""
        try:
            while not self.ctx.join(timeout=max(0.05, self.deadline - time.monotonic())):
                if time.monotonic() >= self.deadline:
                    raise TimeoutError(f"{self.name} on {self.world} gloo processes did not "
                                       f"finish within {self.timeout:.0f} s of its start; "
                                       f"the children were killed")
        finally:
            self.kill()

    def kill(self) -> None:
        for proc in self.ctx.processes:
            if proc.is_alive():
                proc.kill()
            proc.join(5)


@pytest.fixture(scope="session", autouse=True)
def _started_with_the_first_test(request: pytest.FixtureRequest) -> Any:
    """Starts the sm_90 compile process (when a selected test reads ``sm90_compile`` and
    triton has an NVIDIA backend) and each selected ``gloo_group`` test's processes (on
    the interpreter only: with CUDA those tests skip); kills what is left at the end."""
    items = request.session.items
    if (HAVE_TRITON and any("sm90_compile" in getattr(item, "fixturenames", ())
                            for item in items) and _nvidia_backend()):
        _STARTED["sm90"] = _start_sm90_compile()
    for item in items if HAVE_TRITON and INTERPRET else ():
        marker = item.get_closest_marker("gloo_group")
        if marker is not None:
            _STARTED[item.nodeid] = _GlooRun(*marker.args, **marker.kwargs)
    yield
    for job in _STARTED.values():
        job.kill()
    _STARTED.clear()


@pytest.fixture
def gloo_group(request: pytest.FixtureRequest) -> Any:
    """Waits for this test's gloo run (its ``gloo_group`` marker), started with the first
    test of the folder (or now, if it was not)."""
    def wait() -> None:
        run = _STARTED.pop(request.node.nodeid, None)
        if run is None:
            marker = request.node.get_closest_marker("gloo_group")
            run = _GlooRun(*marker.args, **marker.kwargs)
        run.wait()

    return wait


@pytest.fixture(scope="session")
def sm90_compile() -> str:
    """The output of ``compile_for_gpu.py`` (every group: each kernel, ce's constexpr paths,
    the persistent row loop's TTIR) compiled for sm_90 in one fresh process (this one may
    hold the interpreter), started with the first test of this folder and read by the
    three tests that check it (each paid a process start and triton's import before).
    Skips where triton has no NVIDIA backend."""
    if not _nvidia_backend():
        pytest.skip("this triton build has no NVIDIA backend")
    proc = _STARTED.get("sm90") or _start_sm90_compile()
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # a failed case prints FAIL and the run goes on; a crash leaves cases unprinted (the
    # tests count their ok lines), with its traceback here
    return out + err[-3000:]
