"""Checkpoint integrity: each checkpoint records its files' sizes and SHA-256 when saved; one that
no longer matches (damaged bytes, a truncated or missing file) is set aside with a one-line
warning and the previous one is used; when every one is damaged, one clear error."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.checkpoint import INTEGRITY, Checkpointer, damage
from lm.files import FileError


def _state(step: int) -> dict:
    return {"w": jnp.full((4096,), float(step)), "step": jnp.asarray(step, jnp.int32)}


def _target() -> dict:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), _state(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints at steps 1, 2 and 3 (pristine: tests damage copies)."""
    directory = tmp_path_factory.mktemp("saved") / "checkpoints"
    ckpt = Checkpointer(directory, keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {"step": step})
    ckpt.close()
    return directory


@pytest.fixture
def copy(saved, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    return directory


def _largest_file(step_dir):
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _overwrite_4k(step_dir):
    path = _largest_file(step_dir)
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - 2048)
    data[start:start + 4096] = b"\xff" * len(data[start:start + 4096])
    path.write_bytes(bytes(data))


def _truncate(step_dir):
    path = _largest_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


def test_every_checkpoint_records_its_files(saved):
    for step in (1, 2, 3):
        record = json.loads((saved / str(step) / INTEGRITY).read_text())
        assert "state/_METADATA" in record and any(name.startswith("meta/") for name in record)
        assert damage(saved / str(step)) is None


@pytest.mark.parametrize("harm", [_overwrite_4k, _truncate, _drop_metadata])
def test_a_damaged_newest_checkpoint_is_set_aside(copy, harm, capsys):
    harm(copy / "3")
    assert damage(copy / "3") is not None
    ckpt = Checkpointer(copy)
    assert ckpt.usable_step() == 2
    warning = capsys.readouterr().out.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith(f"warning: checkpoint {copy / '3'} is damaged")
    assert "using step 2" in warning[0]
    assert ckpt.all_steps() == [1, 2] and [p.name.split("-")[0] for p in
                                           (copy.parent / "checkpoints.damaged").iterdir()] == ["3"]
    state, meta = ckpt.restore(_target())
    assert meta == {"step": 2} and float(state["w"][0]) == 2.0
    ckpt.save(3, _state(30), {"step": 3})  # the run goes on and saves that step again
    ckpt.close()
    assert Checkpointer(copy).usable_step() == 3


def test_read_only_skips_without_moving(copy, capsys):
    _overwrite_4k(copy / "3")
    ckpt = Checkpointer(copy, read_only=True)
    assert ckpt.usable_step() == 2 and ckpt.all_steps() == [1, 2, 3]
    assert "is damaged" in capsys.readouterr().out
    with pytest.raises(FileError, match=r"checkpoints/3: damaged checkpoint \(state/.* differs"):
        ckpt.restore_params(_target(), 3)
    assert not (copy.parent / "checkpoints.damaged").exists()


def test_every_checkpoint_damaged_is_one_error(copy):
    for step in (1, 2, 3):
        _truncate(copy / str(step))
    with pytest.raises(FileError, match=r"every checkpoint is damaged \(step 3: .*step 1: .*\); "
                                        r"remove .* to train this run from the start"):
        Checkpointer(copy).usable_step()
    assert Checkpointer(copy, read_only=True).all_steps() == [1, 2, 3]  # nothing moved


def test_restored_values_are_the_saved_ones(saved):
    state, meta = Checkpointer(saved, read_only=True).restore(_target(), 1)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4096,), 1.0))
    assert meta == {"step": 1}


def test_a_failed_save_names_the_directory(copy, monkeypatch):
    """A background save that failed (here, as Orbax reports a full disk) surfaces at the next
    save or at close as one FileError naming the checkpoint directory and the reason."""
    ckpt = Checkpointer(copy)

    def full():
        raise ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device")

    ckpt.save(4, _state(4), {"step": 4})
    monkeypatch.setattr(ckpt.manager, "wait_until_finished", full)
    with pytest.raises(FileError, match=rf"{copy}: saving the checkpoint of step 4 failed: .*No space"):
        ckpt.save(5, _state(5), {"step": 5})
    with pytest.raises(FileError, match="No space left on device"):
        ckpt.close()
    monkeypatch.undo()
    ckpt.close()
