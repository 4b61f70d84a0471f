"""State files under attack or contention: symlinks, concurrent and killed saves, zip bombs,
crafted headers. Every case leaves one whole checkpoint or raises a named ValueError."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import tracemalloc
import zipfile

import numpy as np
import pytest

import arrayopt as ao
from arrayopt import state_io
from _arrays import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _adam_state(fill=0.5, n=6):
    opt = ao.adam(0.1)
    params = {"w": np.ones((n, 2), np.float32), "b": np.zeros(2)}
    state = opt.init(params)
    _, state = opt.step(params, {"w": np.full((n, 2), fill, np.float32), "b": np.ones(2)}, state)
    return state


def _leftovers(folder):
    return sorted(f for f in os.listdir(folder) if ".arrayopt-tmp-" in f or f.endswith(".tmp"))


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------- A1: symlinks


def test_a_symlink_at_the_old_temp_name_is_neither_followed_nor_left_as_the_checkpoint(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    os.symlink(victim, tmp_path / "ck.npz.tmp")
    state = _adam_state()
    ao.save_state(state, tmp_path / "ck.npz")
    assert victim.read_bytes() == b"precious"
    assert not os.path.islink(tmp_path / "ck.npz")
    assert snapshot(ao.load_state(tmp_path / "ck.npz", like=state)) == snapshot(state)


def test_a_symlink_named_like_a_dead_writers_temp_file_is_left_alone(tmp_path):
    victim = tmp_path / "victim.npz"
    victim.write_bytes(b"PK\x03\x04 not yours")
    link = tmp_path / f".ck.npz.arrayopt-tmp-{_dead_pid()}-0123456789abcdef"
    os.symlink(victim, link)
    ao.save_state(_adam_state(), tmp_path / "ck.npz")
    assert os.path.islink(link) and victim.read_bytes() == b"PK\x03\x04 not yours"


def test_the_saved_file_has_the_mode_a_plain_open_gives(tmp_path):
    ao.save_state(_adam_state(), tmp_path / "ck.npz")
    (tmp_path / "plain").write_bytes(b"")
    assert os.stat(tmp_path / "ck.npz").st_mode == os.stat(tmp_path / "plain").st_mode


# ---------------------------------------------------------------- A2: concurrent saves


def test_two_threads_saving_to_one_path_leave_one_whole_checkpoint(tmp_path):
    path = tmp_path / "ck.npz"
    states = [_adam_state(0.5), _adam_state(-2.0)]
    errors = []
    barrier = threading.Barrier(2)

    def saver(s):
        barrier.wait()
        for _ in range(40):
            try:
                ao.save_state(s, path)
            except Exception as e:  # noqa: BLE001 - collected and reported below
                errors.append(e)

    threads = [threading.Thread(target=saver, args=(s,)) for s in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    loaded = snapshot(ao.load_state(path, like=states[0]))
    assert loaded in (snapshot(states[0]), snapshot(states[1]))
    assert _leftovers(tmp_path) == []


_SAVER = """
import sys, numpy as np, arrayopt as ao
fill, path, rounds = float(sys.argv[1]), sys.argv[2], int(sys.argv[3])
opt = ao.adam(0.1)
params = {"w": np.ones((6, 2), np.float32), "b": np.zeros(2)}
_, state = opt.step(params, {"w": np.full((6, 2), fill, np.float32), "b": np.ones(2)}, opt.init(params))
for _ in range(rounds):
    ao.save_state(state, path)
"""


def test_two_processes_saving_to_one_path_leave_one_whole_checkpoint(tmp_path):
    path = tmp_path / "ck.npz"
    procs = [subprocess.Popen([sys.executable, "-c", _SAVER, str(fill), str(path), "40"], cwd=ROOT,
                              stderr=subprocess.PIPE) for fill in (0.5, -2.0)]
    errs = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    loaded = snapshot(ao.load_state(path, like=_adam_state()))
    assert loaded in (snapshot(_adam_state(0.5)), snapshot(_adam_state(-2.0)))
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------- A3: a killed save


_HANGING_SAVER = """
import sys, time, numpy as np, arrayopt as ao
from arrayopt import state_io

def hang(f, **arrays):  # a save killed while it writes: a zip file begun, never finished
    f.write(b"PK\\x03\\x04" + bytes(4096))
    f.flush()
    print("writing", flush=True)
    time.sleep(600)

state_io.np.savez = hang
ao.save_state({"x": np.ones(1 << 20)}, sys.argv[1])
"""


def test_a_killed_save_leaves_a_recognisable_temp_file_that_the_next_save_removes(tmp_path):
    path = tmp_path / "ck.npz"
    ao.save_state(_adam_state(), path)
    child = subprocess.Popen([sys.executable, "-c", _HANGING_SAVER, str(path)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"writing\n", child.stderr.read()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    left = _leftovers(tmp_path)
    assert len(left) == 1 and re.fullmatch(rf"\.ck\.npz\.arrayopt-tmp-{child.pid}-[0-9a-f]{{16}}", left[0]), left
    # files that look like ours but are not (other content, or a writer still alive) are kept
    dead = _dead_pid()
    foreign = tmp_path / f".ck.npz.arrayopt-tmp-{dead}-00000000000000aa"
    foreign.write_bytes(b"a user's notes")
    alive = tmp_path / f".ck.npz.arrayopt-tmp-{os.getppid()}-00000000000000bb"
    alive.write_bytes(b"PK\x03\x04 still being written")
    other_target = tmp_path / f".other.npz.arrayopt-tmp-{dead}-00000000000000cc"
    other_target.write_bytes(b"")
    state = _adam_state(3.0)
    ao.save_state(state, path)
    assert _leftovers(tmp_path) == sorted(p.name for p in (foreign, alive, other_target))
    assert snapshot(ao.load_state(path, like=state)) == snapshot(state)


# ---------------------------------------------------------------- A4: zip bombs


def _peak_load_bytes(path, like=None):
    tracemalloc.start()
    try:
        try:
            ao.load_state(path, like=like)
            err = None
        except ValueError as e:
            err = e
        return tracemalloc.get_traced_memory()[1], err
    finally:
        tracemalloc.stop()


def test_an_unreferenced_512_mib_entry_is_never_read(tmp_path):
    state = _adam_state()
    path = tmp_path / "bomb.npz"
    ao.save_state(state, path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("bomb.npy", "w", force_zip64=True) as f:
            chunk = bytes(1 << 24)
            for _ in range(32):
                f.write(chunk)
    assert os.path.getsize(path) < 8 << 20
    peak, err = _peak_load_bytes(path, like=state)
    assert err is None
    assert peak < 64 << 20, peak
    assert snapshot(ao.load_state(path, like=state)) == snapshot(state)


def _replace_entry(src, out, name, data: bytes, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members[name] = data
    with zipfile.ZipFile(out, "w") as z:
        for n, d in members.items():
            z.writestr(n, d, compress_type=compression if n == name else zipfile.ZIP_STORED)


def _npy_header(shape, dtype="|u1"):
    head = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    head += b" " * (63 - (10 + len(head)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head


def test_entries_claiming_more_than_their_shape_needs_are_refused_before_reading(tmp_path):
    state = _adam_state()
    path = tmp_path / "ok.npz"
    ao.save_state(state, path)
    bad = tmp_path / "bad.npz"
    # a .npy header claiming 1 TiB, deflated (a few bytes of zeros on disk)
    _replace_entry(path, bad, "a0.npy", _npy_header((1 << 40,)) + bytes(1 << 16), zipfile.ZIP_DEFLATED)
    peak, err = _peak_load_bytes(bad, like=state)
    assert isinstance(err, ValueError) and repr(os.fspath(bad)) in str(err), err
    assert peak < 64 << 20, peak
    # the same claim in a stored entry, and a stored entry whose zip record claims 4 GiB
    _replace_entry(path, bad, "a0.npy", _npy_header((1 << 40,)) + bytes(64))
    assert "corrupted" in str(_peak_load_bytes(bad, like=state)[1])
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("a0.npy")
    central = raw.find(b"PK\x01\x02")
    while True:  # the central directory record of a0.npy
        name_len = int.from_bytes(raw[central + 28: central + 30], "little")
        if raw[central + 46: central + 46 + name_len] == b"a0.npy":
            break
        central = raw.find(b"PK\x01\x02", central + 4)
    raw[central + 20: central + 28] = (0xFFFFFFF0).to_bytes(4, "little") * 2
    bad.write_bytes(bytes(raw))
    peak, err = _peak_load_bytes(bad, like=state)
    assert isinstance(err, ValueError) and info.file_size < 0xFFFFFFF0, err
    assert peak < 64 << 20, peak


# ---------------------------------------------------------------- A5: crafted headers


def _rewrite_header(path, out, edit):
    with zipfile.ZipFile(path) as z:
        members = {n: np.lib.format.read_array(z.open(n)) for n in z.namelist()}
    meta = json.loads(bytes(members.pop("__meta__.npy")).decode())
    edit(meta["tree"]["dict"])
    arrays = {k[:-4]: v for k, v in members.items()}
    np.savez(out, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


def _mu(tree):
    return tree["mu"]["list"][0]


@pytest.mark.parametrize("edit,match", [
    (lambda t: _mu(t).update(dtype="V8"), "dtype 'V8'"),
    (lambda t: _mu(t).update(dtype="datetime64"), "dtype 'datetime64'"),
    (lambda t: _mu(t).update(dtype="datetime64[ns]"), "dtype 'datetime64"),
    (lambda t: _mu(t).update(dtype="object"), "dtype 'object'"),
    (lambda t: _mu(t).update(shape=[float("inf")]), "shape"),
    (lambda t: _mu(t).update(shape=[2 ** 64 + 1]), "shape"),
    (lambda t: _mu(t).update(shape=[3, -4]), "shape"),
    (lambda t: _mu(t).update(shape=[1000, 1000]), "bytes, more than the whole file"),
    (lambda t: _mu(t).update(shape="12"), "shape"),
    (lambda t: _mu(t).update(array="../../etc/passwd"), "array key"),
    (lambda t: _mu(t).update(array="a99"), "no entry 'a99'"),
    (lambda t: t.update(count={"scalar": "5", "type": "str"}), r"\['count'\] is '5'"),
    (lambda t: t.update(count={"scalar": "5", "type": "int"}), "scalar '5' is not a int"),
    (lambda t: t.update(count={"scalar": -1, "type": "int"}), r"\['count'\] is -1"),
    (lambda t: t.update(count={"scalar": 5, "type": "complex"}), "scalar type 'complex'"),
    (lambda t: t.update(count={"scalar": 5, "type": "int", "extra": 1}), "fields"),
    (lambda t: t.update(consumed={"scalar": 1, "type": "int"}), r"\['consumed'\] is 1"),
    (lambda t: t.update(optimizer={"scalar": None, "type": "NoneType"}), r"\['optimizer'\]"),
    (lambda t: t.update(mu={"list": {"a": 1}}), "list node"),
    (lambda t: t.update(mu=[1, 2]), "not an object"),
])
def test_crafted_headers_raise_named_value_errors_without_like(tmp_path, edit, match):
    path, bad = tmp_path / "ok.npz", tmp_path / "bad.npz"
    ao.save_state(_adam_state(), path)
    _rewrite_header(path, bad, edit)
    with pytest.raises(ValueError, match=match) as info:
        ao.load_state(bad)
    assert repr(os.fspath(bad)) in str(info.value)


def test_deeply_nested_headers_raise_a_named_value_error(tmp_path):
    path, bad = tmp_path / "ok.npz", tmp_path / "bad.npz"
    ao.save_state(_adam_state(), path)
    with zipfile.ZipFile(path) as z:
        members = {n: np.lib.format.read_array(z.open(n)) for n in z.namelist()}
    meta = json.loads(bytes(members.pop("__meta__.npy")).decode())
    meta["tree"] = "@@"
    text = json.dumps(meta).replace('"@@"', '{"list": [' * 100_000 + "]}" * 100_000)
    np.savez(bad, __meta__=np.frombuffer(text.encode(), np.uint8), **{k[:-4]: v for k, v in members.items()})
    with pytest.raises(ValueError, match="path: "):
        ao.load_state(bad)


def test_every_dtype_the_library_writes_round_trips_without_like(tmp_path):
    arrays = {name: (np.arange(6) % 2).astype(name).reshape(2, 3) for name in state_io.DTYPES
              if name != "bfloat16"}
    ao.save_state(arrays, tmp_path / "all.npz")
    loaded = ao.load_state(tmp_path / "all.npz")
    for name, a in arrays.items():
        assert loaded[name].dtype == a.dtype and np.array_equal(loaded[name], a)
