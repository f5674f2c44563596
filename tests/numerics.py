"""Tolerances, comparisons and data movement shared by the core tests.

The pattern: build data in NumPy, move it to the backend under test, move crossent's result
back and compare it with an independent float64 reference at the tolerance of the input
dtype. The references themselves (plain PyTorch, test grids) are in ``references.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from array_api_compat import array_namespace
from hypothesis import HealthCheck, settings

RTOL = {"float64": 1e-10, "float32": 1e-5}
ATOL = {"float64": 1e-14, "float32": 1e-7}
"""Absolute floor of :func:`assert_match`, for entries of a loss or gradient that cancel
to about 0."""
DTYPES = tuple(RTOL)
LOW_PRECISION = ("float16", "bfloat16")

PROPERTY = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
"""Hypothesis settings for property tests (the ``backend`` fixture is immutable, so sharing
it across examples is safe)."""

INF_NAN_EXPECTED = pytest.mark.filterwarnings("ignore::RuntimeWarning")
"""For tests whose inputs make NumPy compute log(0), inf - inf or 0/0 on purpose."""

NAN_MEAN_EXPECTED = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
"""For tests of the intended 0/0 NaN of "mean" over nothing, which NumPy warns about."""


# ---- comparisons -----------------------------------------------------------------------


def assert_close(backend: Any, got: Any, expected: Any, dtype: str = "float64", **kw: Any) -> None:
    """``got`` keeps the input ``dtype`` and matches ``expected`` to ``RTOL[dtype]`` (unless
    ``rtol`` is passed)."""
    out = backend.to_numpy(got)
    assert out.shape == np.shape(expected), f"shape {out.shape}, expected {np.shape(expected)}"
    assert out.dtype == np.dtype(dtype), f"dtype {out.dtype}, expected {dtype}"
    np.testing.assert_allclose(out, expected, **{"rtol": RTOL[dtype], **kw})


def assert_match(got: Any, want: Any, label: str, dtype: str = "float64", atol=None) -> None:
    """``got`` (already NumPy) matches ``want`` to ``RTOL[dtype]`` and ``ATOL[dtype]`` (NaN
    and inf must match exactly). ``label`` names the function and the reference
    (``"function | reference"``) and is shown when the comparison fails."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    np.testing.assert_allclose(
        got, want, rtol=RTOL[dtype], atol=ATOL[dtype] if atol is None else atol, err_msg=label
    )


def rounding(dtype: str, scale: float = 1.0) -> float:
    """An absolute tolerance for results that cancel (``x - logsumexp(x)`` near 0, a mix of
    opposite signs) or that a reference renormalises (``scipy.stats.entropy``): a few
    roundings of ``dtype`` at the size ``scale`` of the inputs."""
    return 8 * float(np.finfo(dtype).eps) * scale


# ---- moving data between NumPy and the backend -----------------------------------------


def as_input(backend: Any, a: Any, dtype: str) -> tuple[Any, np.ndarray]:
    """``a`` as a ``dtype`` array of the backend, and the exact same values as float64 NumPy."""
    a = np.asarray(a).astype(dtype)
    return backend.asarray(a), a.astype("float64")


def on(backend: Any, *arrays: Any) -> list[Any]:
    """Move NumPy arrays to ``backend``; None entries stay None."""
    return [None if a is None else backend.asarray(a) for a in arrays]


def on_kwargs(backend: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments with their NumPy arrays moved to ``backend``."""
    return {k: backend.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}


def rounded_to_float32(*arrays: np.ndarray) -> list[np.ndarray]:
    """Floating arrays rounded to float32 and back, so that a float64 reference sees exactly
    the inputs the float32 computation sees (integer arrays and None pass through)."""
    return [a if a is None or a.dtype.kind != "f" else a.astype(np.float32).astype(np.float64)
            for a in arrays]


# ---- low precision (float16, bfloat16) -------------------------------------------------


def low_precision(backend: Any, dtype: str, *arrays: np.ndarray):
    """Floating ``arrays`` cast to ``dtype`` on ``backend``, and the same values upcast to
    float32 (the computation crossent must do inside). Skips dtypes a backend lacks."""
    if not hasattr(backend.module, dtype):
        pytest.skip(f"{backend.name} has no {dtype}")
    low, upcast = [], []
    for a in arrays:
        if not np.issubdtype(np.asarray(a).dtype, np.floating):
            low.append(backend.asarray(a))
            upcast.append(backend.asarray(a))
            continue
        x = backend.asarray(a, "float32")
        xp = array_namespace(x)
        x = xp.astype(x, backend.dtype(dtype))
        low.append(x)
        upcast.append(backend.asarray(backend.to_numpy(x).astype(np.float32)))
    return low, upcast


def low_precision_input(backend: Any, a: Any, dtype: str) -> Any:
    """``a`` (numbers, taken as float32) as one ``dtype`` array of the backend; skips where
    the backend has no ``dtype``."""
    (low,), _ = low_precision(backend, dtype, np.asarray(a, dtype="float32"))
    return low


def assert_rounded_from(got: Any, want32: Any, backend: Any, dtype: str, label: str) -> None:
    """``got`` has dtype ``dtype`` and is ``want32`` (a float32 result) rounded to it;
    ``label`` as in :func:`assert_match`."""
    assert got.dtype == backend.dtype(dtype) and want32.dtype == backend.dtype("float32")
    # half an ulp relative (unit roundoff), or one smallest subnormal absolute
    info = {"float16": (2.0**-11, 2.0**-24), "bfloat16": (2.0**-8, 2.0**-133)}[dtype]
    got = backend.to_numpy(got).astype(np.float64)
    want = backend.to_numpy(want32).astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=info[0], atol=info[1], err_msg=label)
