"""Lowering for an accelerator this host does not have: the train step that `Trainer` runs
exports for cuda and tpu on abstract meshes with the rules' shardings and no CPU kernel, the
sweep preflight lowers each distinct program once, and the same step compiled on 8 virtual
CPU devices holds the collectives its mesh implies."""

import math
import os
import re
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from lm import bench
from lm import model as model_lib
from lm.config import ConfigError, defaults
from lm.kernels import cpu as cpu_kernels
from lm.sharding import logical_to_spec
from lm.train import Trainer

from .conftest import ROOT, run_python
from .test_bench import parse

NORMS = ("attn_norm", "mlp_norm", "final_norm")


def tiny(mesh, shape="64,2,4,32,8"):
    c = bench.shape_config(defaults(), shape)
    c.mesh.shape = mesh
    return c


@pytest.mark.parametrize("mesh", [(1, 8, 1), (1, 2, 4)], ids=["fsdp", "fsdp+tensor"])
def test_train_step_lowers_for_accelerators_with_the_rules_shardings(mesh):
    config = tiny(mesh)
    assert config.model.kernels == "auto"  # on this CPU host that would be the C++ kernels
    for platform in ("cuda", "tpu"):
        r = bench.lower(config, platform)
        assert (r["lowered"], r["custom_calls"], r["devices"]) == ("ok", "none", 8), r
    if mesh == (1, 8, 1) and cpu_kernels.available():  # what forcing "xla" keeps out
        unforced = Trainer(config, bench.abstract_mesh(mesh), compile=False)
        assert "lm_attention_forward" in bench._lowered_custom_calls(unforced, "cuda")
    trainer = bench.abstract_trainer(config)
    exported = bench.export_train_step(trainer, "cuda")
    assert exported.platforms == ("cuda",) and exported.nr_devices == 8
    assert not [c for c in bench.custom_calls(exported.mlir_module()) if c.startswith("lm_")]
    (state, batch, sched), _ = jax.tree.unflatten(exported.in_tree, exported.in_shardings_jax(trainer.mesh))
    _, abstract, axes = model_lib.abstract_model(config.model)
    specs = {k: logical_to_spec(axes[k], abstract[k].shape, trainer.mesh) for k in axes}
    assert {k: s.spec for k, s in state["params"].items()} == specs
    # Adam's moments are split like their parameters; the counters and step are replicated.
    moments = 0
    for path, s in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]:
        name = getattr(path[-1], "key", None)
        assert s.spec == (specs[name] if name in specs else P()), (path, s)
        moments += name in specs
    assert moments == 2 * len(specs)
    assert state["step"].spec == P() and batch.spec == P(("data", "fsdp"), None)
    # The schedule's numbers are replicated inputs (cosine's unused cooldown start is pruned).
    assert {k: s and s.spec for k, s in sched.items()} == {
        "peak": P(), "warmup": P(), "last": P(), "cooldown": None}
    if mesh == (1, 8, 1):  # every matrix is split 8 ways over its embed axis, norms replicated
        assert {k: bench.shards(s) for k, s in state["params"].items()} == {
            k: 1 if k in NORMS else 8 for k in specs}
        norms = sum(math.prod(abstract[k].shape) for k in NORMS)
        assert r["param_bytes_per_device"] == 4 * ((r["n_params"] - norms) // 8 + norms)
        assert r["sharded_arrays"] == 3 * (len(specs) - len(NORMS)) + 1  # params, mu, nu, batch
    else:
        assert specs["wqkv"] == P(None, "fsdp", None, "tensor", None)
        assert specs["w_out"] == P(None, "tensor", "fsdp")
        assert specs["embed"] == P(None, "fsdp")  # vocab 257 is not divisible by tensor = 4
    assert r["state_bytes_per_device"] == 3 * r["param_bytes_per_device"] + 3 * 4  # + 3 counters


def test_cli_lower_only_prints_one_line_and_refuses_bad_input(capsys):
    bench.run(parse("--lower_only", "--platform=tpu", "--shape", "64,2,4,32,8", "--mesh", "1,4,2",
                    "--dtype", "bfloat16"))
    line = dict(kv.split("=", 1) for kv in capsys.readouterr().out.split())
    assert {k: line[k] for k in ("platform", "mesh", "devices", "dtype", "lowered", "custom_calls")} == {
        "platform": "tpu", "mesh": "1,4,2", "devices": "8", "dtype": "bfloat16", "lowered": "ok",
        "custom_calls": "none"}
    assert int(line["sharded_arrays"]) > 0 and int(line["param_bytes_per_device"]) > 0
    for args, message in (
            (["--platform=gpu"], "--lower_only needs --platform, one of cuda, tpu (not 'gpu')"),
            ([], "--lower_only needs --platform, one of cuda, tpu"),
            (["--platform=cuda", "--mesh", "1,-1,1"], "--mesh='1,-1,1': expected data,fsdp,tensor"),
            (["--platform=cuda", "--shape", "64,2"], "expected five integers"),
            (["--platform=cuda", "--mesh", "1,8,1", "--shape", "64,2,4,32,4"],
             "data.batch_size = 4 is not allowed"),
            (["--platform=cuda", "--steps", "3"], "--steps does not apply to --lower_only")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            bench.run(parse("--lower_only", *args))
        assert capsys.readouterr().out == "", args


def test_preflight_lowers_each_program_once_and_lists_failures():
    from configs.isoflop import tiny as tiny_sweep
    from experiments.plan import plan

    sweep = tiny_sweep.get_config("untuned")
    sweep.budgets, sweep.shapes = (1e11, 3e11), ("16x1,16x2", "16x1,16x2")
    sweep.train.data.seq_len, sweep.train.data.batch_size = 32, 8
    runs = [(r.name, r.config) for r in plan(sweep)]
    lines = []
    assert bench.preflight(runs, "tpu", 2, lines.append) == []
    assert len(runs) == 4 and len(lines) == 3, lines  # two programs (one per shape), the summary
    assert all("mesh=2,1,1" in line and "lowered=ok" in line for line in lines[:2])
    assert lines[0].startswith(f"runs={runs[0][0]},{runs[2][0]} ")
    assert lines[-1] == "preflight: 2 shapes ok, 0 failed"
    lines = []
    failed = bench.preflight(runs[:1], "cuda", 3, lines.append)  # batch 8 on 3 data shards
    assert len(failed) == 1 and "data.batch_size = 8 is not allowed" in failed[0]
    assert lines[-1].startswith("preflight: 0 shapes ok, 1 failed\n  failed: " + runs[0][0])


def test_isoflop_preflight_exits_nonzero_on_failure_without_training(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.isoflop", "--config=configs/isoflop/tiny.py:untuned",
         f"--sweep_dir={tmp_path / 'sweep'}", "--preflight=cuda", "--preflight_devices=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, proc.stderr
    assert "preflight: 0 shapes ok, 7 failed" in proc.stdout  # 15 runs, 7 distinct shapes
    assert not (tmp_path / "sweep").exists()


def test_compiled_step_holds_the_collectives_of_its_mesh():
    """FSDP (1, 8, 1): parameters all-gathered, gradients reduce-scattered or all-reduced;
    tensor parallel (1, 1, 8): activations [batch, length, embed] all-reduced."""
    run_python("""
        import re, jax
        from lm import bench, sharding
        from lm.config import ConfigError, defaults
        from lm.train import Trainer

        def collectives(mesh):
            c = bench.shape_config(defaults(), "64,2,8,32,8")  # d_ff 256
            c.model.kernels, c.mesh.shape = "xla", mesh
            trainer = Trainer(c, sharding.make_mesh(mesh), compile=False)
            with jax.set_mesh(trainer.mesh):
                hlo = trainer.jit_train_step.lower(*trainer.abstract_args).compile().as_text()
            assert 'custom_call_target="lm_' not in hlo
            ops = re.compile(r"\\s(all-gather|reduce-scatter|all-reduce)(?:-start)?\\(")
            return [(m.group(1), line) for line in hlo.splitlines() if " = " in line
                    for m in [ops.search(line)] if m]

        fsdp = collectives((1, 8, 1))
        gathers = [line for op, line in fsdp if op == "all-gather"]
        assert any(re.search(r"= f32\\[(64,256|256,64)\\]", line) for line in gathers), gathers
        grads = [line for op, line in fsdp if op in ("reduce-scatter", "all-reduce")]
        assert any(re.search(r"f32\\[(64,256|256,64|8,256|32,64)\\]", line) for line in grads), grads
        tensor = collectives((1, 1, 8))
        assert any(op == "all-reduce" and re.search(r"= f32\\[8,32,64\\]", line)
                   for op, line in tensor), tensor
        print("ok")
    """, devices=8)
