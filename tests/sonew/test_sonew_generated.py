"""The generated SONew kernels of the Numba backend are current: regenerating gives the committed files.

``backends/numba_cpu/sonew/codegen.py`` writes every file in its ``FILES``; each starts with the
marker line that names the generator and how to rerun it.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("numba", reason="the Numba backend needs numba")

from arrayopt.backends.numba_cpu.sonew import codegen  # noqa: E402

HERE = os.path.dirname(os.path.abspath(codegen.__file__))


def test_generator_writes_the_gen_files_of_its_folder():
    gen = sorted(f for f in os.listdir(HERE) if f.startswith("_gen_") and f.endswith(".py"))
    assert gen and sorted(codegen.FILES) == gen
    for name in gen:
        assert name in codegen.__doc__, f"the generator's docstring does not name {name}"


@pytest.mark.parametrize("name", sorted(codegen.FILES))
def test_committed_file_equals_the_generator_output(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        committed = f.read()
    assert committed.split("\n", 1)[0] == codegen.MARKER
    assert committed == codegen.FILES[name](), f"{name} is stale: run python backends/numba_cpu/sonew/codegen.py"
