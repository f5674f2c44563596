"""Fixtures for the command-line tests: a CliRunner, the article's numbers computed with
``math`` (never copied from crossent's output), and a headless Chromium."""

from __future__ import annotations

import fcntl
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"


def log_b(x: float, base: float) -> float:
    return math.log(x) / math.log(base)


def article_numbers(base: float) -> dict[str, float]:
    """ARTICLE.md's worked examples, computed independently from their definitions."""
    animals, pred, coin, belief = [0.2, 0.3, 0.5], [0.1, 0.2, 0.7], [0.99, 0.01], [0.01, 0.99]
    return {
        "panda": log_b(1 / 0.001, base),
        "entropy": sum(p * log_b(1 / p, base) for p in animals),
        "cross_entropy": log_b(1 / 0.7, base),
        "soft_cross_entropy": sum(
            p * log_b(1 / q, base) for p, q in zip(animals, pred, strict=True)),
        "coin_entropy": sum(p * log_b(1 / p, base) for p in coin),
        "coin_cross_entropy": sum(
            p * log_b(1 / q, base) for p, q in zip(coin, belief, strict=True)),
        "quiz4": log_b(1 / 0.7, base),
    }


def f6(x: float) -> str:
    return f"{x:.6f}"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def install_with_apt(packages: str, paths: tuple[str, ...]) -> None:
    """Debian ``packages`` installed with apt-get unless every one of ``paths`` exists
    (CI runs as root); the test is skipped where they cannot be. A file lock makes the
    pytest-xdist workers install them one at a time: two apt-gets at once fail on dpkg's
    lock."""
    if all(Path(p).exists() for p in paths):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{packages} missing and cannot be installed here (needs root and apt-get)")
    with open(Path(tempfile.gettempdir()) / "crossent-apt-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if all(Path(p).exists() for p in paths):  # another worker installed them
            return
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = f"apt-get update -qq && apt-get install -y -qq {packages}"
        try:
            done = subprocess.run(["sh", "-c", cmd], env=env, capture_output=True, text=True,
                                  timeout=900, check=False)
        except subprocess.TimeoutExpired:
            pytest.skip(f"installing {packages} with apt-get timed out")
        if done.returncode != 0 or not all(Path(p).exists() for p in paths):
            pytest.skip(f"installing {packages} with apt-get failed: {done.stderr[-300:]}")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of Debian's chromium, installed with apt-get when missing."""
    install_with_apt("chromium", (CHROMIUM,))
    return CHROMIUM
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium is missing and cannot be installed (needs root and apt-get)")
    with open(Path(tempfile.gettempdir()) / "crossent-chromium-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not Path(CHROMIUM).exists():
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            cmd = "apt-get update -qq && apt-get install -y -qq chromium"
            done = subprocess.run(["sh", "-c", cmd], env=env, capture_output=True, text=True,
                                  timeout=900, check=False)
            if done.returncode != 0 or not Path(CHROMIUM).exists():
                pytest.skip(f"installing chromium with apt-get failed: {done.stderr[-300:]}")
    return CHROMIUM


@pytest.fixture(scope="session")
def chromedriver() -> str:
    """Debian's chromium and chromedriver, installed with apt-get when missing."""
    install_with_apt("chromium chromium-driver", (CHROMIUM, DRIVER))
    return DRIVER
