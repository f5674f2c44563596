"""One parametrized fixture runs every core test on every array library.

``backend`` yields a :class:`Backend` for NumPy, PyTorch (CPU, and CUDA when a device is
present), JAX (CPU, with float64 enabled) and array-api-strict. Tests build their data
in NumPy, move it with ``backend.asarray`` and compare ``backend.to_numpy(result)`` with
an independent reference (SciPy, PyTorch, scikit-learn, optax, finite differences).
"""

from __future__ import annotations

import importlib
import os
import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

# JAX and array-api-strict are imported (JAX with float64 enabled) before the first file
# outside tests/triton is collected (pytest_collectstart below: before pytest imports a
# test module or reads a file's doctests), not here: the Triton interpreter tests use
# neither, and JAX's import is about a second of their run (issue 12). Every other test
# module is imported after them, as before.
_TRITON_TESTS = pathlib.Path(__file__).parent / "triton"
_STRICT_ARRAY: list[type] = []  # array-api-strict's array type, once imported


def _import_jax_with_float64() -> None:
    if _STRICT_ARRAY:
        return
    import jax

    jax.config.update("jax_enable_x64", True)
    import array_api_strict
    import jax.numpy

    _STRICT_ARRAY.append(type(array_api_strict.asarray(0.0)))


def pytest_collectstart(collector: pytest.Collector) -> None:
    if isinstance(collector, pytest.File) and _TRITON_TESTS not in collector.path.parents:
        _import_jax_with_float64()


@dataclass(frozen=True)
class Backend:
    name: str
    module_name: str  # imported on first use (JAX with float64 enabled)
    device: Any = None

    @property
    def module(self) -> Any:
        if self.module_name.startswith(("jax", "array_api_strict")):
            _import_jax_with_float64()
        return importlib.import_module(self.module_name)

    def asarray(self, a: Any, dtype: str | None = None) -> Any:
        a = np.asarray(a)
        if dtype is not None:
            a = a.astype(dtype)
        if self.name.startswith("torch"):
            return torch.as_tensor(a, device=self.device)
        return self.module.asarray(a)

    def dtype(self, name: str) -> Any:
        return getattr(self.module, name)

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.dtype == torch.bfloat16:
                x = x.float()
            return x.numpy()
        if _STRICT_ARRAY and isinstance(x, _STRICT_ARRAY[0]):
            return np.from_dlpack(x)
        return np.asarray(x)


def _backends() -> list[Any]:
    cuda = torch.cuda.is_available()
    return [
        pytest.param(Backend("numpy", "numpy"), id="numpy"),
        pytest.param(Backend("torch", "torch", "cpu"), id="torch"),
        pytest.param(
            Backend("torch-cuda", "torch", "cuda"),
            id="torch-cuda",
            marks=pytest.mark.skipif(not cuda, reason="no CUDA device on this machine"),
        ),
        pytest.param(Backend("jax", "jax.numpy"), id="jax"),
        pytest.param(Backend("array_api_strict", "array_api_strict"), id="array_api_strict"),
    ]


@pytest.fixture(params=_backends())
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.param


@pytest.fixture(autouse=True, scope="session")
def crossent_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """crossent's cache (the compiled kernel's remembered library) in a temporary folder:
    the tests write nothing to ``~/.cache``; subprocesses inherit it."""
    previous = os.environ.get("CROSSENT_CACHE_DIR")
    os.environ["CROSSENT_CACHE_DIR"] = str(tmp_path_factory.mktemp("crossent-cache"))
    yield os.environ["CROSSENT_CACHE_DIR"]
    if previous is None:
        del os.environ["CROSSENT_CACHE_DIR"]
    else:
        os.environ["CROSSENT_CACHE_DIR"] = previous


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261125)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Skips summarised by reason (one line each) instead of one line per skipped test:
    without a GPU, every CUDA parameter is skipped, and a page of identical lines would
    hide the failures."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    counts: dict[str, int] = {}
    for report in skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        counts[reason] = counts.get(reason, 0) + 1
    terminalreporter.section("skips by reason", sep="-")
    for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{n:6d}  {reason}")
