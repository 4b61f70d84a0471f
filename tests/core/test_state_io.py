"""State files: named errors for bad files, atomic saves, recorded param paths, chains round-trip."""

from __future__ import annotations

import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import arrayopt as ao
from _arrays import snapshot, tree_map


def _state():
    opt = ao.chain(ao.clip_by_global_norm(1.0), ao.adam(0.1))
    params = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2)}
    state = opt.init(params)
    params, state = opt.step(params, {"w": np.full((3, 2), 0.5, np.float32), "b": np.ones(2)}, state)
    return opt, params, state


def _saved(tmp_path):
    opt, params, state = _state()
    path = tmp_path / "s.npz"
    ao.save_state(state, path)
    return state, path, path.read_bytes()


def _load_error(path, like):
    with pytest.raises(ValueError) as info:
        ao.load_state(path, like=like)
    assert repr(os.fspath(path)) in str(info.value), str(info.value)
    return str(info.value)


# ---------------------------------------------------------------- bad files


def test_truncated_empty_and_foreign_files_raise_value_errors_naming_the_path(tmp_path):
    state, path, raw = _saved(tmp_path)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(raw[: len(raw) // 2])
    assert "truncated" in _load_error(bad, state)
    bad.write_bytes(b"")
    assert "empty" in _load_error(bad, state)
    np.savez(bad, x=np.ones(3))
    assert "not an arrayopt state file" in _load_error(bad, state)
    np.save(tmp_path / "one.npy", np.ones(3))
    assert "single .npy array" in _load_error(tmp_path / "one.npy", state)
    bad.write_bytes(b"hello, not a zip at all")
    assert "not a .npz archive" in _load_error(bad, None)


def test_corrupted_byte_in_an_array_or_the_header_raises_a_value_error(tmp_path):
    state, path, raw = _saved(tmp_path)
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(path) as z:
        infos = {i.filename: i for i in z.infolist()}
    for name in ("__meta__.npy", "a0.npy"):
        info = infos[name]
        # the member's data follows its local header (30 bytes + name + extra)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        data = bytearray(raw)
        data[start + info.compress_size - 1] ^= 0xFF  # last data byte of the member
        bad.write_bytes(bytes(data))
        assert "corrupted" in _load_error(bad, state)
    # a flipped "encrypted" flag bit in the central directory (zipfile raises RuntimeError)
    data = bytearray(raw)
    data[raw.find(b"PK\x01\x02") + 8] ^= 0x01
    bad.write_bytes(bytes(data))
    assert "corrupted" in _load_error(bad, state)


def _rewrite_header(path, out, edit):
    with zipfile.ZipFile(path) as z:
        members = {n: np.lib.format.read_array(z.open(n)) for n in z.namelist()}
    meta = json.loads(bytes(members.pop("__meta__.npy")).decode())
    edit(meta)
    arrays = {k[:-4]: v for k, v in members.items()}
    np.savez(out, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


def test_other_format_versions_and_malformed_trees_are_named(tmp_path):
    state, path, _ = _saved(tmp_path)
    bad = tmp_path / "bad.npz"
    _rewrite_header(path, bad, lambda m: m.update(version=1))
    assert "format version 1" in _load_error(bad, state)
    _rewrite_header(path, bad, lambda m: m.update(tree={"dict": {"count": {"oops": 1}}}))
    assert "malformed state tree" in _load_error(bad, None)

    def wrong_size(m):
        m["tree"]["dict"]["inner"]["list"][1]["dict"]["mu"]["list"][0]["shape"] = [4, 2]

    _rewrite_header(path, bad, wrong_size)
    assert "corrupted" in _load_error(bad, None)


@given(pos=st.floats(0.0, 1.0, exclude_max=True), flip=st.integers(1, 255), truncate=st.booleans())
def test_any_damaged_file_loads_exactly_or_raises_a_value_error_naming_the_path(tmp_path_factory, pos, flip,
                                                                                  truncate):
    tmp_path = tmp_path_factory.mktemp("damaged")
    state, path, raw = _saved(tmp_path)
    i = int(pos * len(raw))
    data = raw[:i] if truncate else raw[:i] + bytes([raw[i] ^ flip]) + raw[i + 1:]
    bad = tmp_path / "bad.npz"
    bad.write_bytes(data)
    try:
        loaded = ao.load_state(bad, like=state)
    except ValueError as e:
        assert repr(os.fspath(bad)) in str(e)
    else:  # a byte the zip format does not read (e.g. a timestamp): the state is intact
        assert snapshot(loaded) == snapshot(state)


# ---------------------------------------------------------------- atomic save


def test_failed_save_leaves_the_old_file_and_no_tmp(tmp_path, monkeypatch):
    state, path, raw = _saved(tmp_path)
    from arrayopt import state_io

    def half_write(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(state_io.np, "savez", half_write)
    with pytest.raises(OSError, match="No space left"):
        ao.save_state(state, path)
    assert path.read_bytes() == raw
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]  # no temporary file left
    monkeypatch.undo()
    # the rename itself fails (the target is a folder): no tmp left either
    folder = tmp_path / "folder.npz"
    folder.mkdir()
    with pytest.raises(OSError):
        ao.save_state(state, folder)
    assert sorted(os.listdir(tmp_path)) == ["folder.npz", "s.npz"] and os.listdir(folder) == []


# ---------------------------------------------------------------- recorded param paths and version


def test_file_records_version_and_param_paths_and_renamed_keys_are_caught(tmp_path):
    opt = ao.adam(0.1)
    state = opt.init({"w": np.ones(3, np.float32), "b": np.ones(2, np.float32)})
    path = tmp_path / "s.npz"
    ao.save_state(state, path)
    with zipfile.ZipFile(path) as z:
        meta = json.loads(bytes(np.lib.format.read_array(z.open("__meta__.npy"))).decode())
    assert meta["format"] == ao.state_io.FORMAT and meta["version"] == ao.state_io.VERSION
    assert meta["param_paths"] == ["['w']", "['b']"]
    renamed = opt.init({"weight": np.ones(3, np.float32), "b": np.ones(2, np.float32)})
    msg = _load_error(path, renamed)
    assert "['w']" in msg and "['weight']" in msg
    # the same shapes and dtypes under another optimizer's name are caught too
    with pytest.raises(ValueError, match=r"state\['optimizer'\]: saved 'adam', like= has 'adamw'"):
        ao.load_state(path, like=ao.adamw(0.1).init({"w": np.ones(3, np.float32), "b": np.ones(2, np.float32)}))
    assert ao.load_state(path)["param_paths"] == ("['w']", "['b']")


# ---------------------------------------------------------------- consumed states and files


def test_consumed_state_cannot_be_saved_and_a_loaded_state_is_fresh(tmp_path):
    opt = ao.chain(ao.clip_by_global_norm(1.0), ao.sgd(0.1, momentum=0.9))
    params = {"w": np.ones(3)}
    s0 = opt.init(params)
    params, s1 = opt.step(params, {"w": np.ones(3)}, s0)
    with pytest.raises(ValueError, match=r"state: already consumed"):
        ao.save_state(s0, tmp_path / "s.npz")
    assert not os.path.exists(tmp_path / "s.npz")
    ao.save_state(s1, tmp_path / "s.npz")
    loaded = ao.load_state(tmp_path / "s.npz", like=s1)
    assert loaded["consumed"] is False and loaded["inner"][1]["consumed"] is False
    params, _ = opt.step(params, {"w": np.ones(3)}, loaded)
    with pytest.raises(ValueError, match="already consumed"):
        opt.step(params, {"w": np.ones(3)}, loaded)


# ---------------------------------------------------------------- every registered optimizer in a chain


def _chain_run(opt, tmp_path, n_before=4, n_after=3):
    rng = np.random.default_rng(7)
    params = {"w": rng.normal(size=(6, 5)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    grads = [{"w": rng.normal(size=(6, 5)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
             for _ in range(n_before + n_after)]
    state = opt.init(params)
    for g in grads[:n_before]:
        params, state = opt.step(params, g, state)
    path = tmp_path / "chain.npz"
    ao.save_state(state, path)
    loaded = ao.load_state(path, like=state)
    assert snapshot(loaded) == snapshot(tree_map(lambda x: x, state))
    params2 = tree_map(np.copy, params)
    for g in grads[n_before:]:
        params, state = opt.step(params, g, state)
        params2, loaded = opt.step(params2, g, loaded)
    assert snapshot(params) == snapshot(params2)
    assert snapshot(tree_map(lambda x: x, state)) == snapshot(tree_map(lambda x: x, loaded))


@pytest.mark.parametrize("name", list(ao.registry.registered()))
def test_save_load_continue_inside_chain_is_bit_exact_for_every_registered_optimizer(name, tmp_path):
    overrides = {"block_size": 4, "precondition_every": 2, "start_preconditioning_step": 2} \
        if name.startswith("shampoo") else {}
    _chain_run(ao.chain(ao.clip_by_global_norm(1.0), ao.registry.make(name, **overrides)), tmp_path)


@pytest.mark.parametrize("root_delay", [1, 2])
def test_async_shampoo_inside_chain_settles_on_save(root_delay, tmp_path):
    with ThreadPoolExecutor(1) as ex:
        opt = ao.chain(ao.clip_by_global_norm(1.0),
                       ao.shampoo(0.05, block_size=4, precondition_every=2, root_delay=root_delay, executor=ex))
        _chain_run(opt, tmp_path, n_before=3, n_after=4)
