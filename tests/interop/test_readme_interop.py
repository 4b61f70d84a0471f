"""The README's section on PyTorch, JAX and NumPy loops runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Drop-in for PyTorch, JAX and NumPy loops"


def _blocks():
    text = README.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_section_has_the_three_loops():
    blocks = _blocks()
    assert len(blocks) == 3
    assert "ao.partition" in blocks[0] and "lr_scheduler" in blocks[1] and "jax.jit" in blocks[2]


@pytest.mark.parametrize("index,needs", [(0, None), (1, "torch"), (2, "optax")], ids=["numpy", "torch", "jax"])
def test_each_block_runs(index, needs, tmp_path, monkeypatch):
    if needs:
        pytest.importorskip(needs, reason=f"the README's {needs} example needs {needs}")
    code = _blocks()[index].replace("/tmp/", f"{tmp_path}/")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, f"README.md block {index}", "exec"), namespace)
    if index == 2:
        assert int(namespace["opt_state"][1].count) == 10
