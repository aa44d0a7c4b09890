"""The throughput benchmark: its figures follow from its measurements and the FLOP formulas,
and bad shapes are refused before anything compiles."""

import json

import pytest

from configs.train import get_config
from lm import bench
from lm.sizing import count_params, flops_per_token, flops_per_token_palm


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
    bench.main(["--shape", "32,2,2,32,4", "--steps", "1", "--warmup", "1", "--json", str(out)])
    (result,) = json.loads(out.read_text())
    assert f"step_ms={result['step_ms']:.4g}" in capsys.readouterr().out
    for shape, message in (("32,2", "expected five integers"), ("30,2,4,32,4", "divisible by")):
        with pytest.raises(SystemExit):
            bench.main(["--shape", "32,2,2,32,4", "--shape", shape])
        captured = capsys.readouterr()
        assert message in captured.err and captured.out == ""  # the valid shape never ran
