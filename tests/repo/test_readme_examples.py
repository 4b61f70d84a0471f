"""The front pages: README.md is short and its code runs, the docs' code runs, and the files a
newcomer looks for (LICENSE, CONTRIBUTING.md, .gitattributes, docs/performance.md) are there."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# README blocks that tests/interop/test_readme_interop.py runs (with checks of its own)
INTEROP_SECTION = "## Drop-in for PyTorch, JAX and NumPy loops"
OPTIONAL = ("torch", "jax", "optax", "sklearn", "matplotlib")


def _python_blocks(path: Path):
    text = path.read_text()
    if path == README:
        start = text.index(INTEROP_SECTION)
        end = text.index("\n## ", start + len(INTEROP_SECTION))
        text = text[:start] + text[end:]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
BLOCKS = [(p, i, code) for p in PAGES for i, code in enumerate(_python_blocks(p))]


def test_readme_is_at_most_250_lines():
    n = len(README.read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines; move details to docs/"


def test_readme_names_every_extra_and_links_the_docs():
    readme = README.read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    missing = [e for e in extras if f'pip install ".[{e}]"' not in readme]
    assert not missing, f"README's install section lacks the extras {missing}"
    for page in ("docs/performance.md", "docs/sonew.md", "docs/shampoo.md", "docs/sketchy.md", "docs/eva.md",
                 "docs/interop.md", "CONTRIBUTING.md"):
        assert f"({page})" in readme, page


def test_pyproject_description_names_every_optimizer():
    description = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["description"]
    for name in ("SONew", "Shampoo", "Sketchy", "Eva", "SGD", "Adam", "AdamW", "AdaGrad"):
        assert name in description, name


def test_license_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 150
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == {"text": "Apache-2.0"}


def test_contributing_has_the_commands_and_both_checklists():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    assert 'pip install ".[test]" && python -m pytest' in text and '-m "not slow"' in text
    assert "python -m arrayopt.gpu_check" in text and "asv run" in text
    assert "## Checklist: adding an optimizer" in text and "## Checklist: adding a kernel" in text
    for piece in ("records_<name>.py", "registry.register", "OPS", "nvcc", "_optable.py", "arrayopt/eva/step.py"):
        assert piece in text, piece


def test_gitattributes_marks_generated_binary_and_cuda_files():
    text = (ROOT / ".gitattributes").read_text()
    assert "backends/numba_cpu/**/_gen_*.py linguist-generated=true" in text
    assert re.search(r"^\*\.png binary", text, flags=re.M)
    assert re.search(r"^\*\.cu text", text, flags=re.M) and re.search(r"^\*\.cuh text", text, flags=re.M)


def test_performance_page_has_every_area_with_commands():
    text = (ROOT / "docs/performance.md").read_text()
    for heading in ("## First-order steps", "## SONew", "## Shampoo", "## Sketchy", "## Eva",
                    "## Framework adapters", "## GPU", "## Real-model parameter trees (ResNet-18, GPT-2 small)"):
        assert heading in text, heading
    assert "python asv_bench/scripts/real_trees.py" in text
    sections = re.split(r"\n## ", text)[1:]
    for section in sections:
        title = section.splitlines()[0]
        if "|" in section:   # a section with a table says how it was measured, and when
            assert "`" in section and re.search(r"20\d\d-\d\d-\d\d", section), title


def test_examples_are_found():
    pages = {p.relative_to(ROOT).as_posix() for p, _, _ in BLOCKS}
    assert {"README.md", "docs/sonew.md", "docs/shampoo.md", "docs/sketchy.md", "docs/eva.md", "docs/backends.md"} <= pages


@pytest.mark.parametrize("path,index,code", BLOCKS,
                         ids=[f"{p.relative_to(ROOT).as_posix()}-{i}" for p, i, _ in BLOCKS])
def test_each_python_block_runs(path, index, code, tmp_path, monkeypatch):
    for module in OPTIONAL:
        if re.search(rf"^\s*(import|from)\s+{module}\b|^import .*\b{module}\b", code, flags=re.M):
            pytest.importorskip(module, reason=f"{path.name} block {index} needs {module}")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace("/tmp/", f"{tmp_path}/"), f"{path.name} block {index}", "exec"), namespace)
