"""The repository is self-contained: docs point to files in it, and no dead code is kept."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("arrayopt", "backends", "tests", "asv_bench", "docs")
TEXT_SUFFIXES = (".py", ".cu", ".cuh", ".md", ".toml", ".json")
# Interfaces that are implemented, not called, by name.
INTERFACES = {"Communicator"}
# Files the code writes (the demo's report), not files it cites.
OUTPUT_FILES = {"results.md", "gpu_check.md"}


def _files(suffixes=TEXT_SUFFIXES, folders=FOLDERS):
    out = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "pyproject.toml"] if ".md" in suffixes else []
    for folder in folders:
        out += [p for p in sorted((ROOT / folder).rglob("*"))
                if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts
                and ".asv" not in p.parts and "env" not in p.parts]
    return out


def test_docs_cite_only_files_in_the_repository():
    """Docstrings, comments and test labels used to point to a design folder outside the repo
    (``/work/shared/specs/sonew.md``, ``specs/shampoo.md``): the math now lives in ``docs/``
    (``docs/sonew.md``, ``docs/shampoo.md``, ``docs/sketchy.md``, ``docs/eva.md``)."""
    bad = []
    for path in _files():
        text = path.read_text(errors="replace")
        rel = path.relative_to(ROOT).as_posix()
        if rel == "tests/repo/test_repo_docs.py":
            continue
        for m in re.finditer(r"/work/|shared/|\bspecs?/|\bspec §", text):
            bad.append(f"{rel}: {text[max(0, m.start() - 30):m.end() + 30]!r}")
        for m in re.finditer(r"[\w./-]*[\w-]+\.md\b", text):
            ref = m.group(0).lstrip("./")
            if ref in OUTPUT_FILES:
                continue
            candidates = [ROOT / ref, path.parent / ref]
            if not any(c.is_file() for c in candidates):
                bad.append(f"{rel}: names {ref}, which is not in the repository")
    assert not bad, "\n".join(bad)


def test_the_math_notes_exist_and_define_the_labels_the_code_uses():
    sonew = (ROOT / "docs" / "sonew.md").read_text()
    for label in [f"(S{i})" for i in range(1, 11)] + [f"O{i}" for i in range(1, 19)]:
        assert label in sonew, label
    shampoo = (ROOT / "docs" / "shampoo.md").read_text()
    for label in [f"R{i}" for i in range(1, 10)] + [f"Q{i}" for i in range(1, 7)]:
        assert label in shampoo, label
    eva = (ROOT / "docs" / "eva.md").read_text()
    for label in [f"(E{i})" for i in range(1, 9)] + [f"V{i}" for i in range(1, 14)]:
        assert label in eva, label
    sketchy = (ROOT / "docs" / "sketchy.md").read_text()
    for label in ["(F1)", "(F1a)", "(F2)", "(F3)", "(R9)", "(R10)"] + [f"K{i}" for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 14, 15, 16)]:
        assert label in sketchy, label
    assert "arXiv:2311.10085" in sonew and "arXiv:1802.09568" in shampoo
    assert "arXiv:2308.02123" in eva and "arXiv:2302.03764" in sketchy


def _defined_names(tree):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name


def _without_all_lists(text: str) -> str:
    """``text`` without its ``__all__ = [...]`` lists (naming a function there is not a use)."""
    return re.sub(r"^__all__[^=]*=\s*[\[(].*?[\])]", "", text, flags=re.M | re.S)


def test_no_unused_module_level_functions_or_classes():
    """Every function and class defined at module level in arrayopt/ and backends/ is used
    (called, exported from the top-level package or named by a test) somewhere other than
    its own definition and ``__all__`` lists."""
    sources = {p: p.read_text() for p in _files((".py",))}
    words, definitions = Counter(), Counter()
    for text in sources.values():
        words.update(re.findall(r"\w+", _without_all_lists(text)))
        definitions.update(re.findall(r"^\s*(?:async\s+)?(?:def|class)\s+(\w+)", text, flags=re.M))
    unused = []
    for path, text in sources.items():
        if path.relative_to(ROOT).parts[0] not in ("arrayopt", "backends"):
            continue
        tree = ast.parse(text)
        for name in _defined_names(tree):
            if name.startswith("__") or name in INTERFACES:
                continue
            if words[name] <= definitions[name]:
                unused.append(f"{path.relative_to(ROOT)}: {name}")
    assert not unused, "unused (dead) code:\n" + "\n".join(unused)


def test_removed_dead_helpers_stay_removed():
    import importlib.util

    from arrayopt import _tree, _xp
    from arrayopt.shampoo import config

    assert not hasattr(config, "finite_or_inf")
    # one grafting module (arrayopt.grafting) serves every optimizer
    assert importlib.util.find_spec("arrayopt.shampoo.grafting") is None
    assert not hasattr(_xp.Namespace, "zeros_like") and not hasattr(_xp.Namespace, "full_like")
    assert not hasattr(_tree, "tree_paths")
    assert not any("scalar_like" in p.read_text() for p in (ROOT / "arrayopt" / "sonew").glob("*.py"))
