"""``python -m arrayopt.gpu_check``: its exit without a device, and a whole run on a host
stand-in (NumPy arrays, torch CPU tensors) so its own code paths run without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from arrayopt.backends import cupy_cuda
from arrayopt.gpu_check import cli, gpu_tests, measure
from arrayopt.gpu_check.layer import CupyLayer, HostLayer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_without_a_device_it_exits_at_once_with_a_message(tmp_path, monkeypatch, capsys):
    if cupy_cuda.BACKEND.available():  # a GPU machine: pretend there is none
        monkeypatch.setattr(CupyLayer, "probe", staticmethod(lambda: (False, "pretended")))
        assert cli.main(["--out", str(tmp_path)]) == cli.NO_DEVICE
        err = capsys.readouterr().err
    else:
        proc = subprocess.run([sys.executable, "-m", "arrayopt.gpu_check", "--out", str(tmp_path)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == cli.NO_DEVICE, proc.stderr
        err = proc.stderr
        assert "Traceback" not in err
    assert "no CUDA device here" in err and cli.INSTALL_LINE in err
    assert not os.listdir(tmp_path)


def _fake_tests(folder):
    """A tests folder with two passing GPU tests, one skipped, one failing and one unmarked."""
    folder.mkdir()
    (folder / "conftest.py").write_text("")
    (folder / "test_fake.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.gpu
        @pytest.mark.parametrize("i", [1, 2])
        def test_passes(i):
            assert i

        @pytest.mark.gpu
        def test_skips():
            pytest.skip("needs a CUDA device and cupy")

        @pytest.mark.gpu
        def test_fails():
            assert False

        def test_not_gpu():
            pass
    """))
    (folder / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    return folder


def test_whole_run_on_a_host_stand_in(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "out"
    tests = _fake_tests(tmp_path / "tests")
    rc = cli.main(["--out", str(out), "--tests", str(tests)], layer=HostLayer(),
                  plan=measure.Plan.tiny())
    assert rc == 1  # one failing GPU test
    result = json.loads((out / "gpu_check.json").read_text())
    t = result["tests"]
    assert (t["passed"], t["failed"], t["skipped"]) == (2, 1, 1)
    assert t["failures"] == ["test_fake::test_fails"]
    assert t["skip_reasons"] == {"needs a CUDA device and cupy": 1}
    assert result["errors"] == []
    rows = result["rows"]
    sections = {r["section"] for r in rows}
    assert sections == {"adam", "sonew", "shampoo", "root", "trees"}
    assert all(r["ms"] > 0 for r in rows)
    trees = {r["what"]: r for r in rows if r["section"] == "trees"}
    # every optimizer of the real-tree table ran (no "failed" note) next to torch's fused Adam
    assert set(trees) == {"torch.optim.Adam(fused=True)"} | {name for name, _ in measure.TREE_CONTENDERS}
    assert all(r["x_torch_fused"] > 0 and "note" not in r for r in trees.values())
    whats = {(r["section"], r["what"]) for r in rows}
    assert {("adam", "copy"), ("adam", "ao.adam (NumPy)"), ("adam", "ao.adam (torch tensors)"),
            ("adam", "torch.optim.Adam(fused=True)"), ("sonew", "SONew band-4"),
            ("shampoo", "Shampoo, host roots every 10"),
            ("root", "root on device (Newton, float32)")} <= whats
    adam = next(r for r in rows if r["what"] == "ao.adam (NumPy)")
    assert adam["x_floor"] > 0 and adam["x_torch_fused"] > 0
    assert all(r["max_rel_diff_vs_eigh"] < 1e-4 for r in rows if r["section"] == "root")
    md = (out / "gpu_check.md").read_text()
    assert "2 passed, 1 failed, 1 skipped" in md and "FAILED test_fake::test_fails" in md
    assert "| adam | 4096 | copy |" in md and "host stand-in" in md
    assert (out / "gpu_tests.log").exists()


def test_a_broken_section_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(layer, plan):
        raise RuntimeError("no luck")

    monkeypatch.setattr(measure, "sonew", broken)
    monkeypatch.setattr(measure, "shampoo", lambda layer, plan: [])
    monkeypatch.setattr(measure, "real_trees", lambda layer, plan: [])
    rc = cli.main(["--out", str(tmp_path), "--skip-tests"], layer=HostLayer(),
                  plan=measure.Plan.tiny())
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 1
    assert [e["section"] for e in result["errors"]] == ["broken"]
    assert "RuntimeError: no luck" in (tmp_path / "gpu_check.md").read_text()
    assert {r["section"] for r in result["rows"]} == {"adam"}


def test_plans_cover_the_sizes_the_check_promises():
    full, quick = measure.Plan.full(), measure.Plan.quick()
    assert full.first_order_sizes == (1_000_000, 10_000_000, 100_000_000)
    assert set(quick.first_order_sizes) < set(full.first_order_sizes)
    assert gpu_tests.find_tests(ROOT) == os.path.join(ROOT, "tests")
