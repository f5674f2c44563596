"""House style: every public function and class shows a doctest-sized example (the
examples run under ``--doctest-modules``), and each core module says which of its names
are public (``__all__``: the rest are helpers shared inside the core)."""

import importlib
import inspect

import pytest

import crossent

CORE = ["measures", "activations", "targets", "losses", "grad"]
MODULES = ["crossent", *(f"crossent.{m}" for m in CORE), "crossent.torch",
           "crossent.torch.distributed", "crossent.integrations.conventions",
           "crossent.integrations.transformers", "crossent.training"]
NEEDS = {"crossent.torch": "torch", "crossent.torch.distributed": "torch",
         "crossent.integrations.transformers": "transformers"}


def _public(module_name):
    if module_name in NEEDS:
        pytest.importorskip(NEEDS[module_name])
    module = importlib.import_module(module_name)
    for name in module.__all__:
        obj = getattr(module, name)
        documented = inspect.isfunction(obj) or (
            inspect.isclass(obj) and not issubclass(obj, Exception))
        if documented:
            yield name, obj


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_function_and_class_has_an_example(module_name):
    missing = [name for name, obj in _public(module_name)
               if ">>>" not in (inspect.getdoc(obj) or "")]
    assert not missing, f"{module_name}: no example in {missing}"


def test_core_modules_export_exactly_the_package_api():
    exported = {}
    for m in CORE:
        for name in importlib.import_module(f"crossent.{m}").__all__:
            assert name not in exported, f"{name} in crossent.{exported.get(name)} and {m}"
            exported[name] = m
    functions = {n for n in crossent.__all__ if not n.endswith("Error")}
    assert set(exported) == functions
