"""The ``>>>`` examples in the package's docstrings run and print what they show.

A module whose examples need an optional framework (torch, JAX/optax,
ml_dtypes) is skipped with the reason when that framework is absent.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import arrayopt

NEEDS = {"arrayopt.interop._optax_transform": "optax", "arrayopt.interop._torch_capture": "torch",
         "arrayopt.interop._torch_optimizer": "torch", "arrayopt.explain": "ml_dtypes"}


def _modules_with_examples():
    names = []
    for info in pkgutil.walk_packages(arrayopt.__path__, "arrayopt."):
        if ".gpu_check" in info.name or info.name.endswith("__main__"):
            continue
        try:
            mod = importlib.import_module(info.name)
        except ImportError:  # an optional framework's adapter module: listed in NEEDS
            continue
        if any(t.examples for t in doctest.DocTestFinder().find(mod)):
            names.append(info.name)
    return names


MODULES = _modules_with_examples()


def test_the_examples_are_found():
    assert {"arrayopt.sonew.optimizer", "arrayopt.sonew.math", "arrayopt.eva.optimizer", "arrayopt.shampoo.optimizer",
            "arrayopt.sketchy.optimizer", "arrayopt.explain", "arrayopt.groups"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name], reason=f"the examples of {name} need {NEEDS[name]}")
    mod = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    runner = doctest.DocTestRunner(optionflags=flags)
    for test in doctest.DocTestFinder().find(mod):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
