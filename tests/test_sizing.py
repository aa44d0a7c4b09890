import numpy as np
import pytest

from configs.train import model_config
from lm.sizing import (
    count_params,
    flops_per_token,
    flops_per_token_6n,
    forward_flops_per_sequence,
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


def test_shape_picker_follows_aspect_ratio_and_counts():
    wide = shape_for_params(1e8, aspect_ratio=128)
    deep = shape_for_params(1e8, aspect_ratio=32)
    assert wide.d_model / wide.n_layers > deep.d_model / deep.n_layers
    non_emb = shape_for_params(1e6, count="non_embedding")
    assert abs(count_params(non_emb).non_embedding / 1e6 - 1) < 0.10
    with pytest.raises(ValueError, match="target"):
        shape_for_params(-5)
