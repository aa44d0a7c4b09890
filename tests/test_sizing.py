import numpy as np
import pytest

from configs.train import model_config
from lm.sizing import (
    count_params,
    d_ff_for,
    flops_per_token,
    flops_per_token_6n,
    forward_flops_per_sequence,
    heads_for,
    model_for_shape,
    shape_for_params,
)


def test_flops_per_token_by_hand():
    m = model_config()  # d=64, L=2, H=4 (k=16), f=256, V=257, GELU
    s = 128
    per_layer = (2 * 3 * s * 64 * 64      # qkv: 3,145,728
                 + 2 * s * s * 64         # logits: 2,097,152
                 + 3 * 4 * s * s          # softmax: 196,608
                 + 2 * s * s * 64         # weighted sum: 2,097,152
                 + 2 * s * 64 * 64        # output: 1,048,576
                 + 2 * s * 2 * 64 * 256)  # mlp: 8,388,608
    forward = 2 * per_layer + 2 * s * 64 * 257  # + final logits; embedding lookup = 0
    assert forward == 38_158_336
    assert forward_flops_per_sequence(m, s)["forward_total"] == forward
    assert flops_per_token(m, s) == 3 * forward / s == 894_336


def test_swiglu_mlp_has_three_matrices():
    m = model_config()
    gelu = forward_flops_per_sequence(m, 64)["mlp"]
    m.activation = "swiglu"
    assert forward_flops_per_sequence(m, 64)["mlp"] == 1.5 * gelu


def test_ratio_to_6nd_approaches_one_for_wide_models():
    m = model_config()
    m.n_layers, m.vocab_size = 12, 32_000
    ratios = []
    for d in (256, 1024, 4096, 16_384):
        m.d_model, m.n_heads, m.d_ff = d, d // 64, 4 * d
        ratios.append(flops_per_token(m, 2048) / flops_per_token_6n(m))
    errors = np.abs(np.array(ratios) - 1)
    assert np.all(np.diff(errors) < 0), ratios
    assert errors[-1] < 0.05, ratios


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("aspect", [32, 64, 128])
def test_shape_picker_within_ten_percent(activation, aspect):
    base = model_config()
    base.activation = activation
    for target in np.logspace(4, 9, 16):
        cfg = shape_for_params(target, aspect_ratio=aspect, base=base)
        n = count_params(cfg).total
        assert abs(n / target - 1) < 0.10, (target, n, cfg.d_model, cfg.n_layers)
        assert cfg.d_model % cfg.n_heads == 0 and (cfg.d_model // cfg.n_heads) % 2 == 0
        assert cfg.n_heads == max(1, round(cfg.d_model / 64))  # picked widths need no head adjustment
        assert cfg.to_dict() == model_for_shape(base, cfg.d_model, cfg.n_layers).to_dict()


def test_shape_picker_follows_aspect_ratio_and_counts():
    wide = shape_for_params(1e8, aspect_ratio=128)
    deep = shape_for_params(1e8, aspect_ratio=32)
    assert wide.d_model / wide.n_layers > deep.d_model / deep.n_layers
    non_emb = shape_for_params(1e6, count="non_embedding")
    assert abs(count_params(non_emb).non_embedding / 1e6 - 1) < 0.10
    with pytest.raises(ValueError, match="target"):
        shape_for_params(-5)


def test_head_and_ffn_rules():
    assert [heads_for(d, 64) for d in (64, 96, 200, 256, 1000)] == [1, 2, 2, 4, 10]  # 200: 3 -> 2
    assert [heads_for(d, 16) for d in (8, 24, 40, 48, 80)] == [1, 2, 2, 3, 5]
    with pytest.raises(ValueError, match="even d_model"):
        heads_for(17, 16)
    assert d_ff_for(64, 4.0) == 256 and d_ff_for(96, 8 / 3) == 256
    assert d_ff_for(64, 3.5) == 224 and d_ff_for(2, 1.0) == 8


def test_gpu_study_swiglu_width_is_its_ffn_ratio():
    """configs/isoflop/gpu.py asks for d_ff = 8/3 d_model (SwiGLU at a GELU MLP's cost); every
    planned model gets that width, not 2/3 of it again."""
    from configs.isoflop import gpu
    from experiments.plan import plan

    sweep = gpu.get_config()
    assert sweep.train.model.activation == "swiglu"
    for r in plan(sweep):
        m = r.config.model
        assert abs(m.d_ff - sweep.ffn_ratio * m.d_model) <= 4, (r.name, m.d_model, m.d_ff)
