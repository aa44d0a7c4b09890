import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import attention, kernels
from lm import model as model_lib
from lm.kernels import cpu
from lm.sizing import count_params


def _forward(cfg, tokens, seed=0):
    graphdef, params = nnx.split(model_lib.Transformer(cfg, rngs=nnx.Rngs(seed)))
    return model_lib.apply(graphdef, nnx.to_pure_dict(params), tokens)


def test_causality(tiny_model):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, tiny_model.vocab_size, size=(2, 24))
    logits = _forward(tiny_model, jnp.asarray(tokens))
    for t in (0, 7, 22):
        changed = tokens.copy()
        changed[:, t + 1:] = rng.integers(0, tiny_model.vocab_size, size=changed[:, t + 1:].shape)
        other = _forward(tiny_model, jnp.asarray(changed))
        np.testing.assert_allclose(other[:, : t + 1], logits[:, : t + 1], atol=1e-5)
        assert not np.allclose(other[:, t + 1:], logits[:, t + 1:])


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shape,qk_norm", [
    ((32, 1, 2, 64, 0), False), ((48, 3, 3, 96, 0), True), ((64, 2, 2, 128, 16), True)])
def test_param_count_matches_tree(tiny_model, activation, tied, shape, qk_norm):
    cfg = tiny_model
    cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, cfg.head_dim = shape
    cfg.activation, cfg.tied_embeddings, cfg.qk_norm = activation, tied, qk_norm
    _, params, _ = model_lib.abstract_model(cfg)
    leaves = jax.tree.leaves(params)
    assert count_params(cfg).total == sum(int(np.prod(x.shape)) for x in leaves)
    embedding = params["embed"].size + (0 if tied else params["unembed"].size)
    assert count_params(cfg).non_embedding == count_params(cfg).total - embedding


def test_every_param_has_logical_axes(tiny_model):
    _, params, axes = model_lib.abstract_model(tiny_model)
    flat_p, flat_a = jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=lambda a: isinstance(a, tuple))
    assert len(flat_p) == len(flat_a)
    for p, a in zip(flat_p, flat_a, strict=True):
        assert len(a) == p.ndim and all(isinstance(n, str) for n in a)


def test_remat_and_bfloat16_logits_match_float32(tiny_model):
    tokens = jnp.arange(32).reshape(2, 16) % tiny_model.vocab_size
    ref = _forward(tiny_model, tokens)
    tiny_model.remat = "full"
    np.testing.assert_allclose(_forward(tiny_model, tokens), ref, atol=1e-5)
    tiny_model.remat, tiny_model.dtype = "none", "bfloat16"
    out = _forward(tiny_model, tokens)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.1)


def test_qk_norm_bounds_the_attention_logits(tiny_model):
    """With qk_norm, scaling wqkv's query and key columns changes nothing (each head's q and k
    are normed before the logits); without it the logits scale and the output moves."""
    tokens = jnp.arange(32).reshape(2, 16) % tiny_model.vocab_size
    for qk_norm in (True, False):
        tiny_model.qk_norm = qk_norm
        graphdef, state = nnx.split(model_lib.Transformer(tiny_model, rngs=nnx.Rngs(0)))
        params = nnx.to_pure_dict(state)
        scaled = dict(params, wqkv=params["wqkv"] * jnp.array([30.0, 30.0, 1.0])[:, None, None])
        same = np.allclose(model_lib.apply(graphdef, scaled, tokens),
                           model_lib.apply(graphdef, params, tokens), atol=1e-4)
        assert same == qk_norm
        assert ("q_norm" in params) == qk_norm


def test_tied_embeddings_share_the_matrix(tiny_model):
    tiny_model.tied_embeddings = True
    _, params, _ = model_lib.abstract_model(tiny_model)
    assert "unembed" not in params


def test_cross_entropy_and_z_loss():
    logits = jnp.log(jnp.array([[[0.25, 0.25, 0.5]]]))
    ce, total = model_lib.cross_entropy(logits, jnp.array([[2]]), z_loss=0.5)
    np.testing.assert_allclose(ce, np.log(2), rtol=1e-6)
    np.testing.assert_allclose(total, ce, atol=1e-6)  # normalised logits: log Z = 0
    ce2, total2 = model_lib.cross_entropy(logits + 1.0, jnp.array([[2]]), z_loss=0.5)
    np.testing.assert_allclose(ce2, ce, rtol=1e-6)
    np.testing.assert_allclose(total2, ce + 0.5, rtol=1e-6)


def _reference_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def _assert_attention_matches(fn, reference, *args):
    """fn's values and the gradients of a non-linear loss with respect to every argument equal
    the reference's (to float32 rounding: 2e-5 absolute, 1e-5 relative)."""
    def grads(fn):
        return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=tuple(range(len(args))))(*args)

    np.testing.assert_allclose(fn(*args), reference(*args), atol=2e-5, rtol=1e-5)
    for got, want in zip(grads(fn), grads(reference), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("length,block", [(40, 16), (100, 64), (8, 64)])
def test_blockwise_attention_matches_full_attention(length, block):
    """Values and gradients equal the reference causal attention, also for a ragged last block."""
    q, k, v = jax.random.normal(jax.random.key(length), (3, 2, length, 3, 8))
    _assert_attention_matches(lambda q, k, v: attention.blockwise_causal_attention(q, k, v, block),
                              _reference_attention, q, k, v)


@pytest.mark.parametrize("batch,length,heads,dim", [
    (2, 40, 3, 8),     # one ragged block, head_dim narrower than a vector
    (1, 130, 2, 20),   # three blocks, the last ragged; head_dim padded to the vector width
    (2, 192, 2, 64),   # whole blocks, wide heads
    (3, 1, 1, 4),      # a single position
])
def test_cpu_kernel_attention_matches_full_attention(batch, length, heads, dim):
    """The C++ kernel equals the reference attention in value and in the gradients."""
    assert cpu.available(), "the C++ kernel did not build (see the warning)"
    q, k, v = 2 * jax.random.normal(jax.random.key(length), (3, batch, length, heads, dim))
    _assert_attention_matches(jax.jit(cpu.causal_attention), _reference_attention, q, k, v)


def test_cpu_kernel_build_failure_names_the_command(tmp_path, monkeypatch):
    """Without a working compiler the build raises with the command; 'auto' then falls back."""
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(RuntimeError, match=r"false .*cpu\.cc.* failed"):
        cpu.build(tmp_path)
    assert not list(tmp_path.iterdir())  # no half-written library left behind
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="no-such-compiler"):
        cpu.build(tmp_path)


def test_cpu_kernels_unavailable_is_a_warning(tmp_path, monkeypatch):
    """An unwritable cache (or a failed build) warns and reports the kernels unavailable."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("LM_CACHE_DIR", str(blocker / "cache"))
    cpu._library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="CPU kernels not available, using pure XLA"):
            assert not cpu.available()
    finally:
        monkeypatch.undo()
        cpu._library.cache_clear()
    assert cpu.available()


def test_cpu_kernel_rejects_what_it_cannot_run():
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match=r"float32 .* got bfloat16\[1, 8, 2, 4\]"):
        cpu.causal_attention(q.astype(jnp.bfloat16), q, q)
    with pytest.raises(ValueError, match=r"got float32\[1, 8, 3, 2, 4\]"):  # a fused qkv
        cpu.causal_attention(jnp.zeros((1, 8, 3, 2, 4)), q, q)
    with pytest.raises(ValueError, match=r"float32\[1, 8, 2, 6\]"):
        cpu.causal_attention(q, jnp.zeros((1, 8, 2, 6)), q)


@pytest.mark.parametrize("shape", [(37, 70), (1, 5), (16, 16), (64, 48), (4096, 128)])
def test_cpu_kernel_transpose(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    np.testing.assert_array_equal(jax.jit(cpu.transpose)(x), x.T)
    assert "lm_transpose" in str(jax.make_jaxpr(cpu.transpose)(x))
    xb = x.astype(jnp.bfloat16)  # not the kernel's dtype: the XLA transpose
    np.testing.assert_array_equal(jax.jit(cpu.transpose)(xb), xb.T)


def _loss_and_grads(cfg, tokens):
    graphdef, params = nnx.split(model_lib.Transformer(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(params)

    def loss(params):
        return jnp.mean(model_lib.apply(graphdef, params, tokens) ** 2)

    trace = str(jax.make_jaxpr(jax.grad(lambda p: loss(p)))(params))  # a new function: no cache
    return jax.value_and_grad(loss)(params), trace


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_cpu_kernels_match_the_reference(tiny_model, monkeypatch, activation):
    """model.kernels='auto' on CPU (the C++ attention and transposes, the lean GELU) gives the
    loss and gradients of the plain-JAX reference ('xla'), and so does its fallback where the
    kernels cannot be built (blockwise attention, barrier-guarded transposes)."""
    tiny_model.activation = activation
    tokens = jnp.arange(2 * 70).reshape(2, 70) % tiny_model.vocab_size  # 70 = 64 + a ragged block
    tiny_model.kernels = "xla"
    reference, trace = _loss_and_grads(tiny_model, tokens)
    assert "lm_" not in trace and kernels.select(tiny_model) is kernels.REFERENCE
    tiny_model.kernels = "auto"
    with_kernels, trace = _loss_and_grads(tiny_model, tokens)
    assert "lm_attention" in trace and "lm_transpose" in trace
    monkeypatch.setattr(cpu, "available", lambda: False)
    fallback, trace = _loss_and_grads(tiny_model, tokens)
    assert "lm_" not in trace
    for got in (with_kernels, fallback):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["blockwise", "xla"])
def test_attention_implementations_agree(tiny_model, impl):
    tokens = jnp.arange(2 * 70).reshape(2, 70) % tiny_model.vocab_size
    tiny_model.kernels, tiny_model.attention = "xla", "auto"
    ref = _forward(tiny_model, tokens)
    tiny_model.attention = impl
    np.testing.assert_allclose(_forward(tiny_model, tokens), ref, atol=1e-5)


def test_cpu_gelu_matches_jax_value_and_gradient():
    x = jnp.linspace(-8, 8, 1001)
    np.testing.assert_allclose(cpu.gelu(x), jax.nn.gelu(x, approximate=True), atol=1e-6)
    np.testing.assert_allclose(jax.vmap(jax.grad(cpu.gelu))(x),
                               jax.vmap(jax.grad(jax.nn.gelu))(x), atol=1e-6)


@pytest.mark.parametrize("x_shape,w_shape,axes", [
    ((2, 5, 8), (8, 24), 1), ((2, 5, 24), (24, 8), 1),  # MLP in and out
    ((2, 5, 8), (8, 3, 2, 4), 1), ((2, 5, 3, 4), (3, 4, 6), 2),  # q/k/v and output projections
])
def test_cpu_dense_matches_tensordot(x_shape, w_shape, axes):
    x, w = jax.random.normal(jax.random.key(0), x_shape), jax.random.normal(jax.random.key(1), w_shape)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, axes)))  # noqa: E731
    np.testing.assert_allclose(cpu.dense(x, w, axes), jnp.tensordot(x, w, axes), rtol=1e-5,
                               atol=1e-5)
    ours = jax.grad(loss(cpu.dense), argnums=(0, 1))(x, w)
    ref = jax.grad(loss(jnp.tensordot), argnums=(0, 1))(x, w)
    for g, r in zip(ours, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
