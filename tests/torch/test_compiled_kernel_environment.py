"""``CROSSENT_COMPILED_KERNEL``: the environment's opt-in to the compiled kernel (for code
that cannot call ``crossent.torch.set_compiled_kernel``: a script run by a launcher, the
Hugging Face ``Trainer``). Read once, at first use; ``set_compiled_kernel`` overrides it.
No compile happens here: the route is proven with a spy in place of the kernel."""

from __future__ import annotations

import pytest
import torch

import crossent.torch as xt
from crossent.errors import InputError, UnsupportedError
from crossent.torch import _backends, _inductor


class _Taken(Exception):
    pass


@pytest.fixture
def fresh(monkeypatch):
    """The opt-in undecided (as in a new process), the environment variable unset; the
    previous state restored after."""
    monkeypatch.setattr(_inductor, "_enabled", None)
    monkeypatch.delenv(_inductor.ENVIRONMENT, raising=False)
    monkeypatch.setattr(_backends, "NATIVE_MAX_LOGITS", 0)
    return monkeypatch


def _bf16_call():
    z = torch.randn(8, 16).bfloat16().requires_grad_()
    return xt.cross_entropy(z, torch.randint(0, 16, (8,)))


def _spy(*args, **kwargs):
    raise _Taken


@pytest.mark.parametrize("value", [None, "", "0"])
def test_unset_or_zero_keeps_the_row_block_kernel(fresh, value):
    if value is not None:
        fresh.setenv(_inductor.ENVIRONMENT, value)
    fresh.setattr(_inductor, "softmax_grad_rows", _spy)
    _bf16_call().backward()  # the spy would raise: the compiled route was not taken
    assert _inductor._enabled is False


def test_one_opts_in_and_set_compiled_kernel_overrides_it(fresh):
    fresh.setenv(_inductor.ENVIRONMENT, "1")
    fresh.setattr(_inductor, "available", lambda: True)
    fresh.setattr(_inductor, "softmax_grad_rows", _spy)
    with pytest.raises(_Taken):
        _bf16_call()
    assert xt.set_compiled_kernel(False) is True  # the environment's setting, returned
    _bf16_call().backward()  # off now, whatever the environment says


def test_set_compiled_kernel_before_first_use_reports_the_environment(fresh):
    fresh.setenv(_inductor.ENVIRONMENT, "1")
    fresh.setattr(_inductor, "available", lambda: True)
    assert xt.set_compiled_kernel(False) is True
    assert _inductor._enabled is False


@pytest.mark.parametrize("value", ["yes", "true", "2", " 1"])
def test_other_values_raise_naming_the_variable(fresh, value):
    fresh.setenv(_inductor.ENVIRONMENT, value)
    with pytest.raises(InputError, match="CROSSENT_COMPILED_KERNEL"):
        _bf16_call()


def test_one_without_a_compiler_raises_naming_the_variable(fresh):
    fresh.setenv(_inductor.ENVIRONMENT, "1")
    fresh.setattr(_inductor, "available", lambda: False)
    with pytest.raises(UnsupportedError, match=r"CROSSENT_COMPILED_KERNEL=1.*compiler"):
        _bf16_call()


def test_read_once_at_first_use(fresh):
    fresh.setenv(_inductor.ENVIRONMENT, "0")
    _bf16_call().backward()
    fresh.setenv(_inductor.ENVIRONMENT, "1")  # too late: decided at first use
    fresh.setattr(_inductor, "softmax_grad_rows", _spy)
    _bf16_call().backward()
