"""The throughput benchmark: its figures follow from its measurements and the FLOP formulas,
and bad shapes are refused before anything compiles."""

import json
import re

import jax
import numpy as np
import pytest
from absl import flags

from configs.train import get_config
from lm import bench
from lm.config import ConfigError
from lm.sizing import count_params, flops_per_token, flops_per_token_palm


def parse(*args: str) -> flags.FlagValues:
    """The flags of `python -m lm.bench ARGS`, parsed on their own FlagValues."""
    fv = flags.FlagValues()
    bench.define_flags(fv)
    fv(["lm.bench", *args])
    return fv


def test_benchmark_reports_consistent_figures():
    config = bench.shape_config(get_config(), "32,2,2,32,4")
    r = bench.benchmark(config, steps=3, warmup=1)
    m = config.model
    assert r["shape"] == "32,2,2,32,4" and r["n_params"] == count_params(m).total
    assert r["flops_per_token"] == flops_per_token(m, 32)
    assert r["flops_per_token_palm"] == flops_per_token_palm(m, 32)
    assert r["tokens_per_sec"] == pytest.approx(4 * 32 / (r["step_ms"] / 1e3))
    assert r["achieved_flops"] == pytest.approx(r["tokens_per_sec"] * r["flops_per_token"])
    assert r["mfu"] == pytest.approx(r["achieved_flops"] / r["peak_flops"])
    assert 0 < r["mfu"] < 1 and r["compile_s"] > 0 and r["page_faults"] >= 0
    line = dict(kv.split("=", 1) for kv in bench.format_line(r).split())
    assert set(line) == set(r) and float(line["step_ms"]) == pytest.approx(r["step_ms"], rel=1e-3)


def test_cli_writes_json_and_refuses_bad_shapes_before_compiling(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.run(parse("--shape", "32,2,2,32,4", "--steps", "1", "--warmup", "1", "--json", str(out)))
    (result,) = json.loads(out.read_text())
    assert f"step_ms={result['step_ms']:.4g}" in capsys.readouterr().out
    for shape, message in (("32,2", "expected five integers"), ("30,2,4,32,4", "divisible by")):
        with pytest.raises(ConfigError, match=message):
            bench.run(parse("--shape", "32,2,2,32,4", "--shape", shape))
        assert capsys.readouterr().out == ""  # the valid shape never ran


def _line(out: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in out.split())


def test_data_mode_times_the_input_pipeline(data_dir, capsys):
    bench.run(parse("--what=data", "--data_dir", str(data_dir), "--seq_len", "32", "--batch_size", "4",
                    "--steps", "5"))
    line = _line(capsys.readouterr().out.splitlines()[-1])
    assert (line["tokenizer"], line["seq_len"], line["batch_size"], line["steps"]) == (
        "bytes", "32", "4", "5")
    assert float(line["tokens_per_s"]) == pytest.approx(4 * 32 / (float(line["batch_us"]) / 1e6),
                                                        rel=0.02)
    with pytest.raises(ConfigError, match="config.data.tokenizer = 'bpe' is not allowed"):
        bench.run(parse("--what=data", "--data_dir", str(data_dir), "--tokenizer", "bpe"))


def test_fit_mode_compares_the_jax_fit_with_scipy(tmp_path, capsys):
    out = tmp_path / "fit.json"
    bench.run(parse("--what=fit", "--points", "40", "--scipy_starts", "3", "--bootstrap", "0",
                    "--json", str(out)))
    (r,) = json.loads(out.read_text())
    assert _line(capsys.readouterr().out)["starts"] == str(r["starts"]) == "4500"
    assert r["scipy_all_s"] == pytest.approx(r["scipy_s"] * r["starts"] / 3)
    assert r["speedup"] == pytest.approx(r["scipy_all_s"] / r["jax_s"])
    assert 0 < r["jax_s"] < r["jax_first_s"]  # the first call compiles
    assert r["objective"] <= r["scipy_objective"] * (1 + 1e-9)  # the best of 4,500 starts vs 3 of them
    assert "bootstrap_s" not in r


def test_the_fit_benchmark_table_is_shaped_like_chinchillas():
    t = bench.fit_table()
    C = 6 * t["N"] * t["D"]
    assert len(t) == 240 and C.round(-15).nunique() == 8
    assert 7e7 <= t["N"].min() and t["N"].max() <= 1.6e10 and 5e9 <= t["D"].min() and t["D"].max() <= 5e11
    assert bench.fit_table(40).shape == (40, 3)


def test_scipy_objective_is_the_fits_own(tmp_path):
    from lm.analysis import approach3

    t = bench.fit_table(40)
    logs = [np.log(t[c].to_numpy()) for c in ("N", "D", "loss")]
    theta = np.array([6.0, 6.0, 0.5, 0.34, 0.28])
    value, grad = bench._scipy_objective(*logs)(theta)
    with jax.enable_x64(True):
        assert value == pytest.approx(float(approach3.objective(theta, *logs, 1.0)), rel=1e-12)
        np.testing.assert_allclose(grad, jax.grad(approach3.objective)(theta, *logs, 1.0), rtol=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--what=data", "--shape", "32,2,2,32,4"], "--shape does not apply to --what=data"),
    (["--what=fit", "--steps", "3"], "--steps does not apply to --what=fit"),
    (["--points", "20"], "--points does not apply to --what=step; it is read by --what=fit"),
    (["--what=data", "--lower_only"], "--lower_only lowers the train step"),
    (["--what=data", "--steps", "0"], "--steps=0 is not allowed: must be a positive integer"),
    (["--what=fit", "--bootstrap=-1"], "--bootstrap=-1 is not allowed: must be >= 0"),
    (["--what=speed"], "--what='speed' is not allowed: must be one of step, data, fit"),
])
def test_options_of_another_mode_are_refused(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        bench.mode_of(parse(*args))
