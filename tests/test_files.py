"""Atomic writes: a reader never sees half a result file, and a failed write leaves the old one."""

import json
import threading

import pytest

from lm.files import write_json_atomic


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
