"""Training engine: learning, exact resume, preemption, divergence, sharding, outputs."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.train import get_config
from lm import optim
from lm.checkpoint import Checkpointer
from lm.config import ConfigError

from .conftest import ROOT, STEPS, run_python


def overrides(c) -> list[str]:
    """The command-line flags that turn configs/train.py into `c`."""
    flat = {"model.d_model": c.model.d_model, "model.n_layers": c.model.n_layers,
            "model.n_heads": c.model.n_heads, "model.d_ff": c.model.d_ff,
            "model.kernels": c.model.kernels,
            "data.data_dir": c.data.data_dir, "data.seq_len": c.data.seq_len,
            "data.batch_size": c.data.batch_size, "data.eval_batches": c.data.eval_batches,
            "train.steps": c.train.steps, "train.log_every": c.train.log_every,
            "train.eval_every": c.train.eval_every,
            "train.checkpoint_every": c.train.checkpoint_every, "optim.peak_lr": c.optim.peak_lr}
    return [f"--config.{k}={v}" for k, v in flat.items()]


def losses(workdir: Path) -> list:
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x.get("loss"), x.get("eval_loss")) for x in lines]


def final_params(workdir: Path, config):
    from lm import sharding
    from lm.train import Trainer

    trainer = Trainer(config, sharding.make_mesh((1, 1, 1)))
    ckpt = Checkpointer(workdir / "checkpoints", read_only=True)
    state, _ = ckpt.restore(trainer.abstract_state)
    return jax.device_get(state["params"]), ckpt.latest_step()


def test_outputs_and_learning(config, reference, data_dir):
    workdir, result = reference
    assert result["status"] == "completed" and result["steps"] == STEPS
    saved = json.loads((workdir / "result.json").read_text())
    for key in ("status", "n_params", "n_params_non_embedding", "tokens", "flops", "flops_6nd",
                "train_loss", "eval_loss", "steps", "wall_seconds", "tokens_per_second", "mfu",
                "config_hash"):
        assert key in saved, key
    assert saved["tokens"] == STEPS * 8 * 32
    assert saved["flops"] == pytest.approx(saved["tokens"] * saved["flops_per_token"])
    assert json.loads((workdir / "config.json").read_text())["model"]["d_model"] == 32
    assert list((workdir / "tensorboard").iterdir())
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train_lines] == list(range(10, STEPS + 1, 10))
    assert {"tokens", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(train_lines[0])
    assert [x["step"] for x in lines if "eval_loss" in x] == [100, 200, 300]
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]


def test_rerun_of_a_finished_run_keeps_its_result(config, reference, tmp_path):
    """Run again at its last step (or killed before result.json), a run trains nothing and
    writes the same completed result, eval loss included."""
    from lm.train import train

    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    (workdir / "result.json").unlink()
    result = train(config, workdir)
    assert result["status"] == "completed" and result["steps"] == STEPS
    assert result["eval_loss"] == reference[1]["eval_loss"]
    assert result["train_loss"] == reference[1]["train_loss"]


def test_bfloat16_training_tracks_float32(config, reference, tmp_path):
    """The bf16 compute path (float32 parameters) of the accelerator path trains to within
    0.05 of the float32 run's final train and eval losses on the same data."""
    from lm.train import train

    config.model.dtype = "bfloat16"
    result = train(config, tmp_path / "bf16")
    assert result["status"] == "completed"
    for key in ("train_loss", "eval_loss"):
        assert abs(result[key] - reference[1][key]) < 0.05, (key, result[key], reference[1][key])


def test_loss_falls_below_unigram_entropy(config):
    from lm import data
    from lm.train import train

    dataset = data.build_dataset(config)
    counts = np.bincount(np.concatenate([dataset.train_batch(k).ravel() for k in range(200)]),
                         minlength=257).astype(float)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    config.train.steps, config.train.eval_every, config.train.checkpoint_every = 300, 300, 300
    config.train.log_every = 50
    config.data.seq_len = 64
    config.model.d_model, config.model.n_heads, config.model.d_ff = 64, 4, 256
    config.optim.peak_lr = 6e-3
    import tempfile

    result = train(config, tempfile.mkdtemp())
    assert result["eval_loss"] < unigram - 0.8, (result["eval_loss"], unigram)


def test_config_mismatch_needs_overwrite(config, reference, tmp_path):
    import shutil

    from lm.train import train

    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    config.model.d_model = 48
    config.model.n_heads = 2
    with pytest.raises(ConfigError, match="different config.*--overwrite"):
        train(config, workdir)
    config.train.steps = 3
    result = train(config, workdir, overwrite=True)
    assert result["steps"] == 3 and json.loads((workdir / "config.json").read_text())[
        "model"]["d_model"] == 48


def _spawn(config, workdir):
    return subprocess.Popen(
        [sys.executable, "-m", "lm.train", "--config=configs/train.py", f"--workdir={workdir}",
         *overrides(config)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"))


def _wait_for(predicate, proc, timeout=120):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - start < timeout
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_exact_resume(config, reference, tmp_path, how):
    ref_dir, _ = reference
    workdir = tmp_path / "run"
    proc = _spawn(config, workdir)
    if how == "sigterm":
        _wait_for(lambda: (workdir / "metrics.jsonl").exists()
                  and len((workdir / "metrics.jsonl").read_text().splitlines()) >= 2, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 75, proc.stdout.read()
        assert json.loads((workdir / "result.json").read_text())["status"] == "preempted"
    else:
        _wait_for(lambda: (workdir / "checkpoints" / "50").is_dir(), proc)
        proc.kill()
        proc.wait()
    stopped_at = Checkpointer(workdir / "checkpoints", read_only=True).latest_step()
    assert stopped_at is not None and stopped_at < STEPS
    proc = _spawn(config, workdir)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert f"resumed from step {stopped_at}" in out
    assert losses(workdir) == losses(ref_dir)
    ref_params, _ = final_params(ref_dir, config)
    params, step = final_params(workdir, config)
    assert step == STEPS
    for name in ref_params:
        np.testing.assert_array_equal(params[name], ref_params[name], err_msg=name)


def _rewound_copy(ref_dir: Path, tmp_path: Path) -> Path:
    """A copy of the reference run whose last checkpoint (step 300) is gone: latest is 250."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))
    return workdir


def test_crash_mid_save_is_ignored(config, reference, tmp_path):
    """A checkpoint left half-written (Orbax's temporary directory) is never restored."""
    import shutil

    from lm.train import train

    ref_dir, _ = reference
    workdir = _rewound_copy(ref_dir, tmp_path)
    partial = workdir / "checkpoints" / f"{STEPS}.orbax-checkpoint-tmp-1234567"
    shutil.copytree(workdir / "checkpoints" / "250", partial)
    for f in partial.rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    assert Checkpointer(workdir / "checkpoints", read_only=True).latest_step() == 250
    result = train(config, workdir)
    assert result["status"] == "completed"
    assert losses(workdir) == losses(ref_dir)


def test_nan_marks_run_diverged_and_keeps_checkpoint(config, reference, tmp_path, monkeypatch):
    from lm import model
    from lm.train import train

    workdir = _rewound_copy(reference[0], tmp_path)
    good, _ = final_params(workdir, config)
    real = model.cross_entropy

    def nan_loss(logits, targets, z_loss=0.0):
        ce, total = real(logits, targets, z_loss)
        return ce * jnp.nan, total * jnp.nan

    monkeypatch.setattr(model, "cross_entropy", nan_loss)
    result = train(config, workdir)
    assert result["status"] == "diverged" and result["diverged_step"] == 250
    assert json.loads((workdir / "result.json").read_text())["status"] == "diverged"
    monkeypatch.undo()
    params, step = final_params(workdir, config)
    assert step == 250
    for name in good:
        np.testing.assert_array_equal(params[name], good[name])


def test_no_recompilation_after_first_step(config, tmp_path):
    from lm.train import train

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: compiles.append(event) if event.endswith("backend_compile_duration")
        else None)
    counts = []
    for steps in (10, 30):
        compiles.clear()
        config.train.steps = steps
        train(config, tmp_path / f"run{steps}")
        counts.append(len(compiles))
    assert counts[0] == counts[1], counts


def test_sharded_training_matches_one_device(config, tmp_path):
    """Data-parallel, FSDP and tensor meshes step for step against one device.

    A short run: this tiny model at lr 1e-2 is chaotic (gradient spikes amplify float reassociation
    differences from ~1e-7 to percent level within ~50 steps), so the long run is no test of sharding.
    """
    from lm.train import train

    config.train.steps, config.train.log_every, config.train.eval_every = 12, 1, 12
    train(config, tmp_path / "one")
    ref = losses(tmp_path / "one")
    code = f"""
        import json
        from configs.train import get_config
        from lm.train import train
        c = get_config()
        c.update_from_flattened_dict({{k: v for k, v in {_flat(config)!r}.items()}})
        for shape in [(8, 1, 1), (2, 2, 2)]:
            c.mesh.shape = shape
            train(c, "{tmp_path}/" + "x".join(map(str, shape)))
    """
    run_python(code, devices=8)
    for shape in ("8x1x1", "2x2x2"):
        got = losses(tmp_path / shape)
        assert [s for s, *_ in got] == [s for s, *_ in ref]
        for (step, loss, ev), (_, loss_ref, ev_ref) in zip(got, ref, strict=True):
            assert (loss or ev) == pytest.approx(loss_ref or ev_ref, rel=1e-5), (shape, step)


def _flat(config) -> dict:
    return {f"{s}.{k}": v for s in ("model", "data", "train", "optim")
            for k, v in config[s].items()}


def test_schedules():
    c = get_config().optim
    c.warmup_frac, c.final_frac = 0.1, 0.1
    lr = optim.schedule(c, 1.0, 100)
    assert float(lr(9)) == pytest.approx(1.0) and float(lr(0)) == pytest.approx(0.1)
    assert float(lr(99)) == pytest.approx(0.1, abs=1e-7)  # exactly final_frac on the last step
    assert all(float(lr(t)) >= float(lr(t + 1)) for t in range(10, 99))
    c.schedule, c.cooldown_frac = "wsd", 0.2
    lr = optim.schedule(c, 1.0, 100)
    assert [float(lr(t)) for t in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert float(lr(80)) < 1.0 and float(lr(99)) == 0.0
    assert float(lr(89)) == pytest.approx(0.5)  # linear cooldown: halfway at the middle
    c.cooldown_shape = "1-sqrt"
    assert float(optim.schedule(c, 1.0, 100)(89)) == pytest.approx(1 - math.sqrt(0.5))


def test_width_rule_and_decay_mask():
    c = get_config().optim
    c.lr_rule, c.peak_lr, c.base_width, c.max_lr = "inverse_width", 6e-3, 128, 2e-2
    assert optim.peak_lr(c, 256) == pytest.approx(3e-3)
    assert optim.peak_lr(c, 16) == pytest.approx(2e-2)  # capped
    mask = optim.decay_mask({"embed": 0, "wqkv": 0, "attn_norm": 0, "final_norm": 0}, False)
    assert mask == {"embed": False, "wqkv": True, "attn_norm": False, "final_norm": False}
