"""The comparison the core tests share: crossent's result, moved back to NumPy, against an
independent float64 reference, at the tolerance of the input dtype."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

RTOL = {"float64": 1e-10, "float32": 1e-5}
DTYPES = tuple(RTOL)

PROPERTY = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
"""Hypothesis settings for property tests (the ``backend`` fixture is immutable, so sharing
it across examples is safe)."""

INF_NAN_EXPECTED = pytest.mark.filterwarnings("ignore::RuntimeWarning")
"""For tests whose inputs make NumPy compute log(0), inf - inf or 0/0 on purpose."""


def assert_close(backend: Any, got: Any, expected: Any, dtype: str = "float64", **kw: Any) -> None:
    """``got`` keeps the input ``dtype`` and matches ``expected`` to ``RTOL[dtype]`` (unless
    ``rtol`` is passed)."""
    out = backend.to_numpy(got)
    assert out.shape == np.shape(expected), f"shape {out.shape}, expected {np.shape(expected)}"
    assert out.dtype == np.dtype(dtype), f"dtype {out.dtype}, expected {dtype}"
    np.testing.assert_allclose(out, expected, **{"rtol": RTOL[dtype], **kw})


def rounding(dtype: str, scale: float = 1.0) -> float:
    """An absolute tolerance for results that cancel (``x - logsumexp(x)`` near 0, a mix of
    opposite signs) or that a reference renormalises (``scipy.stats.entropy``): a few
    roundings of ``dtype`` at the size ``scale`` of the inputs."""
    return 8 * float(np.finfo(dtype).eps) * scale


def as_input(backend: Any, a: Any, dtype: str) -> tuple[Any, np.ndarray]:
    """``a`` as a ``dtype`` array of the backend, and the exact same values as float64 NumPy."""
    a = np.asarray(a).astype(dtype)
    return backend.asarray(a), a.astype("float64")


LOW_PRECISION = ("float16", "bfloat16")


def low_precision_input(backend: Any, a: Any, dtype: str) -> Any:
    """``a`` as a float16/bfloat16 array of the backend; skips where the backend has none."""
    module = backend.module
    if not hasattr(module, dtype):
        pytest.skip(f"{backend.name} has no {dtype}")
    x = backend.asarray(np.asarray(a, dtype="float32"))
    if backend.name.startswith("torch"):
        return x.to(getattr(module, dtype))
    return module.astype(x, getattr(module, dtype))
