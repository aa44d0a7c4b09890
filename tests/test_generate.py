import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import model as model_lib
from lm.config import ConfigError
from lm.generate import filter_logits, generate, make_decoder


def _sharpened(cfg):
    """A random tiny model with a sharper output layer, so greedy paths are not all ties."""
    model = model_lib.Transformer(cfg, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    params["unembed"] = params["unembed"] * 50
    return graphdef, params


@pytest.fixture
def trained_like(tiny_model):
    return _sharpened(tiny_model)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_cached_decoding_equals_full_forward(tiny_model, qk_norm):
    tiny_model.qk_norm = qk_norm
    graphdef, params = _sharpened(tiny_model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 257, (3, 20)), jnp.int32)
    full = model_lib.apply(graphdef, params, tokens)
    step = make_decoder(graphdef, 0.0, 0, 1.0)
    cache = nnx.merge(graphdef, params).init_cache(3, 24)
    for t in range(20):
        _, logits, cache = step(params, cache, tokens[:, t], jnp.int32(t), jax.random.key(0))
        np.testing.assert_allclose(logits, full[:, t], atol=2e-5, rtol=1e-5)


def test_greedy_equals_repeated_argmax(trained_like):
    graphdef, params = trained_like
    prompt = [10, 20, 30, 40]
    out = generate(graphdef, params, [prompt], 12, 32, temperature=0.0)[0]
    seq = list(prompt)
    for _ in range(12):
        logits = model_lib.apply(graphdef, params, jnp.asarray([seq]))
        seq.append(int(jnp.argmax(logits[0, -1])))
    assert out == seq[len(prompt):]


def test_batched_prompts_of_different_lengths(trained_like):
    graphdef, params = trained_like
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7], [100, 101, 102]]
    batched = generate(graphdef, params, prompts, 6, 16, temperature=0.0)
    for p, out in zip(prompts, batched, strict=True):
        assert out == generate(graphdef, params, [p], 6, 16, temperature=0.0)[0]


def test_sampling_is_seeded_and_top_k_one_is_greedy(trained_like):
    graphdef, params = trained_like
    prompts = [[65, 66, 67]] * 2
    a = generate(graphdef, params, prompts, 10, 16, temperature=1.0, seed=3)
    b = generate(graphdef, params, prompts, 10, 16, temperature=1.0, seed=3)
    assert a == b
    greedy = generate(graphdef, params, prompts, 10, 16, temperature=0.0)
    assert generate(graphdef, params, prompts, 10, 16, temperature=2.0, top_k=1, seed=5) == greedy


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, 1.0, 2, 1.0)) == [True, True, False, False]
    # nucleus: the smallest set whose mass reaches p (0.5 + 0.3 >= 0.7; 0.5 < 0.7)
    assert kept(filter_logits(logits, 1.0, 0, 0.7)) == [True, True, False, False]
    assert kept(filter_logits(logits, 1.0, 0, 0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, 1.0, 0, 0.96)) == [True, True, True, True]
    draws = jax.random.categorical(jax.random.key(0), filter_logits(logits, 1.0, 0, 0.7),
                                   shape=(4000,))
    freq = np.bincount(np.asarray(draws), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.03)


def test_prompt_too_long_names_both_lengths(trained_like):
    graphdef, params = trained_like
    with pytest.raises(ValueError, match="prompt of 20 tokens.*context of 16"):
        generate(graphdef, params, [list(range(20))], 1, 16)


@pytest.mark.parametrize("setting, message", [
    ({"temperature": -1.0}, "temperature = -1.0 is not allowed: must be a finite number >= 0"),
    ({"temperature": float("nan")}, "temperature = nan is not allowed"),
    ({"top_p": 0.0}, r"top_p = 0.0 is not allowed: must lie in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p = 1.5 is not allowed"),
    ({"top_k": -2}, "top_k = -2 is not allowed: must be >= 0"),
    ({"max_new_tokens": -5}, "max_new_tokens = -5 is not allowed: must be a positive integer"),
    ({"max_new_tokens": 0}, "max_new_tokens = 0 is not allowed"),
])
def test_settings_that_mean_nothing_are_refused(trained_like, setting, message):
    """Before: a negative temperature sampled from the inverted distribution, top_p = 0 emitted
    token 0 and max_new_tokens = -5 returned nothing, all without a word."""
    graphdef, params = trained_like
    kwargs = {"max_new_tokens": 4, **setting}
    with pytest.raises(ConfigError, match=message):
        generate(graphdef, params, [[1, 2]], context=16, **kwargs)


def test_no_prompt_is_refused(trained_like):
    graphdef, params = trained_like
    for prompts in ([], [[1], []]):
        with pytest.raises(ConfigError, match="every one needs at least one token"):
            generate(graphdef, params, prompts, 4, 16)
