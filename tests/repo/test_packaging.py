"""Packaging: what the wheel ships, and how ``arrayopt.backends`` is found.

``backends/`` is installed as ``arrayopt.backends`` (``package-dir`` in pyproject.toml,
subpackages found in setup.py). In a source checkout, ``arrayopt/__init__.py`` maps that one
name to the top-level folder; nothing else of the checkout (``tests``, ``asv_bench``) is
importable as part of ``arrayopt``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_SUFFIXES = (".py", ".cu", ".cuh")
SKIP_DIRS = {"__pycache__", ".hypothesis", ".pytest_cache"}


def _source_files(base: Path, folder: str) -> list:
    """Files under ``base/folder`` that must ship: every .py, .cu, .cuh and README.md."""
    out = []
    for dirpath, dirnames, filenames in os.walk(base / folder):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in filenames:
            if name.endswith(SHIPPED_SUFFIXES) or name == "README.md":
                out.append((Path(dirpath) / name).relative_to(base).as_posix())
    return sorted(out)


def _run(args, cwd, timeout=120):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """``(wheel, source copy)``: the wheel built from a copy of the checkout (the checkout
    itself is not written to), with one new subpackage added under ``arrayopt/`` and one
    under ``backends/``, as a contributor would add them: both must ship without being
    listed anywhere."""
    for mod in ("pip", "setuptools"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns(*SKIP_DIRS, "*.pyc", "*.so", "*.egg-info", "build")
    for folder in ("arrayopt", "backends"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
        new = src / folder / "newly_added" / "deeper"
        new.mkdir(parents=True)
        for pkg in (new.parent, new):
            (pkg / "__init__.py").write_text('"""A subpackage that no list names."""\n')
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(dist), str(src)], cwd=tmp, timeout=300)
    (whl,) = dist.glob("arrayopt-*.whl")
    return whl, src


def test_wheel_ships_every_package_and_kernel_source_and_nothing_else(wheel):
    whl, src = wheel
    names = set(zipfile.ZipFile(whl).namelist())
    expected = set(_source_files(src, "arrayopt"))
    expected |= {f"arrayopt/{p}" for p in _source_files(src, "backends")}
    assert "arrayopt/newly_added/deeper/__init__.py" in expected
    assert "arrayopt/backends/newly_added/deeper/__init__.py" in expected
    assert any(p.endswith(".cu") for p in expected) and any(p.endswith(".cuh") for p in expected)
    missing = sorted(expected - names)
    assert not missing, f"missing from the wheel: {missing}"
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"arrayopt"}, top
    leaked = sorted(n for n in names
                    if n.startswith(("arrayopt/tests/", "arrayopt/asv_bench/", "tests/", "asv_bench/",
                                     "backends/")) or "__pycache__" in n)
    assert not leaked, f"the wheel ships files it should not: {leaked}"


def test_package_description_names_only_what_ships(wheel):
    with zipfile.ZipFile(wheel[0]) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    summary = next(line for line in meta.splitlines() if line.startswith("Summary:"))
    import arrayopt

    # every optimizer the summary names ships as a factory, and every second-order one is named
    for name in ("SONew", "Shampoo", "Sketchy", "Eva", "SGD", "Adam", "AdamW", "AdaGrad"):
        assert name in summary, summary
        assert callable(getattr(arrayopt, name.lower())), name


def test_every_module_imports_from_an_install_of_the_wheel(wheel, tmp_path):
    whl, src = wheel
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
          "--target", str(target), str(whl)], cwd=tmp_path, timeout=300)
    script = textwrap.dedent(f"""
        import importlib, json, pkgutil, sys
        target = {str(target)!r}
        sys.path.insert(0, target)
        import arrayopt
        assert arrayopt.__file__.startswith(target), arrayopt.__file__
        names = ["arrayopt"] + [m.name for m in pkgutil.walk_packages(arrayopt.__path__, "arrayopt.")]
        for name in names:
            mod = importlib.import_module(name)
            assert mod.__file__.startswith(target), (name, mod.__file__)
        for name in ("arrayopt.tests", "arrayopt.asv_bench", "backends"):
            try:
                importlib.import_module(name)
            except ImportError:
                continue
            raise AssertionError(name + " is importable from the installed wheel")
        assert arrayopt.backends_available()[:1] == ["numba_cpu"]
        print(json.dumps(sorted(names)))
    """)
    # -I: neither the checkout (cwd, PYTHONPATH) nor user site-packages is on sys.path
    out = _run([sys.executable, "-I", "-c", script], cwd=tmp_path, timeout=300)
    imported = set(json.loads(out.strip().splitlines()[-1]))

    def module_name(path: str) -> str:
        parts = path[: -len(".py")].split("/")
        if parts[0] == "backends":
            parts = ["arrayopt"] + parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    sources = {module_name(p) for p in _source_files(src, "arrayopt") + _source_files(src, "backends")
               if p.endswith(".py")}
    assert imported == sources, (sorted(sources - imported), sorted(imported - sources))


def test_checkout_maps_only_arrayopt_backends():
    """From the repo root (as ``python -m pytest`` runs), ``arrayopt.backends`` is the
    checkout's ``backends/``, and ``tests``/``asv_bench`` are not part of ``arrayopt``."""
    script = textwrap.dedent("""
        import importlib, os, sys
        import arrayopt, arrayopt.backends, arrayopt.backends.numba_cpu, arrayopt.backends.cupy_cuda
        root = os.getcwd()
        assert arrayopt.__file__ == os.path.join(root, "arrayopt", "__init__.py"), arrayopt.__file__
        assert arrayopt.backends.__file__ == os.path.join(root, "backends", "__init__.py")
        assert arrayopt.backends.numba_cpu.__file__ == os.path.join(root, "backends", "numba_cpu", "__init__.py")
        assert all(root not in p or p.startswith(os.path.join(root, "arrayopt")) for p in arrayopt.__path__), arrayopt.__path__
        for name in ("arrayopt.tests", "arrayopt.asv_bench", "arrayopt.tests.conftest"):
            try:
                importlib.import_module(name)
            except ImportError:
                continue
            raise AssertionError(name + " is importable from the checkout")
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
