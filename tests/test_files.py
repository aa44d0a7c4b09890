"""Atomic writes: a reader never sees half a file, a failed write leaves the old one, names its file
and leaves no temporary file."""

import errno
import json
import os
import threading

import numpy as np
import pytest

from lm.files import RunLock, load_array, write_array_atomic, write_json_atomic


def test_readers_never_see_a_half_written_file(tmp_path):
    path = tmp_path / "result.json"
    write_json_atomic(path, {"version": -1})
    big = {"losses": list(range(20_000))}
    stop, seen, errors = threading.Event(), set(), []

    def read():
        while not stop.is_set():
            try:
                seen.add(json.loads(path.read_text())["version"])
            except json.JSONDecodeError as e:  # a torn read
                errors.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    for version in range(40):
        write_json_atomic(path, {**big, "version": version})
    stop.set()
    reader.join()
    assert not errors and len(seen) > 1
    assert not [p for p in tmp_path.iterdir() if p.name != "result.json"]  # no temp files left


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "result.json"
    write_json_atomic(path, {"status": "completed", "loss": float("nan")})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"status": "broken", "value": object()})
    assert json.loads(path.read_text()) == {"status": "completed", "loss": None}  # strict JSON
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_names_the_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    """A write or fsync refused for lack of space is an OSError naming the file being written
    (what `lm.cli.run` prints as one line), and the previous version stays."""
    path = tmp_path / "config.json"
    write_json_atomic(path, {"v": 1})
    monkeypatch.setattr(os, "fsync", _full_disk)
    with pytest.raises(OSError) as e:
        write_json_atomic(path, {"v": 2})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert json.loads(path.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_array_on_a_full_disk_fails_before_mapping_and_cleans_up(tmp_path, monkeypatch):
    """The space of a token cache is reserved before it is filled: a full disk is an OSError
    naming the cache (not a SIGBUS in a memory map), and no temporary file is left."""
    path = tmp_path / "train.npy"
    monkeypatch.setattr(os, "posix_fallocate", _full_disk)
    with pytest.raises(OSError) as e:
        write_array_atomic(path, (np.arange(1000) for _ in range(3)), np.uint16)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert list(tmp_path.iterdir()) == []


def test_array_written_in_chunks_reads_back(tmp_path):
    path = tmp_path / "train.npy"
    chunks = [np.arange(5), np.arange(0), np.arange(7, 10)]
    assert write_array_atomic(path, iter(chunks), np.uint16) == 8
    got = load_array(path)
    assert got.dtype == np.uint16 and got.tolist() == [0, 1, 2, 3, 4, 7, 8, 9]
    assert [p.name for p in tmp_path.iterdir()] == ["train.npy"]
    assert write_array_atomic(tmp_path / "empty.npy", iter([]), np.uint16) == 0
    assert load_array(tmp_path / "empty.npy").shape == (0,)


def test_run_lock_is_never_left_half_written(tmp_path, monkeypatch):
    """A lock whose owner record could not be written is removed, so it blocks nobody."""
    monkeypatch.setattr(json, "dump", _full_disk)
    with pytest.raises(OSError) as e:
        RunLock(tmp_path).acquire()
    assert e.value.filename == str(tmp_path / ".lock") and not (tmp_path / ".lock").exists()
