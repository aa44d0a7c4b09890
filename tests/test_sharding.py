import pytest
from jax.sharding import PartitionSpec as P

from lm.config import ConfigError
from lm.sharding import RULES, logical_to_spec, make_mesh

from .conftest import run_python


def test_logical_rules_and_uneven_fallback():
    assert logical_to_spec(("batch", "length")) == P(("data", "fsdp"), None)
    assert logical_to_spec(("layers", "embed", "mlp")) == P(None, "fsdp", "tensor")
    assert set(RULES) >= {"batch", "length", "embed", "heads", "kv", "mlp", "vocab", "layers"}


def test_mesh_must_match_devices():
    with pytest.raises(ConfigError, match=r"mesh.shape.*number of devices \(1\)"):
        make_mesh((2, 1, 1))
    assert make_mesh((-1, 1, 1)).shape == {"data": 1, "fsdp": 1, "tensor": 1}


def test_sharded_forward_matches_one_device():
    """Logits of the accelerator path (plain JAX) on meshes (8,1,1), (1,8,1), (2,2,2) equal
    one device; params follow the rules."""
    run_python("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import PartitionSpec as P
        from configs.train import model_config
        from lm import model as M, sharding as S

        assert jax.device_count() == 8
        cfg = model_config()
        cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff = 64, 2, 4, 128
        cfg.kernels = "xla"
        graphdef, abstract, axes = M.abstract_model(cfg)
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, 257, (8, 32)), jnp.int32)
        ref_params = M.init_params(cfg, 0, None)
        one = S.make_mesh((1, 1, 1), jax.devices()[:1])
        with jax.set_mesh(one):
            ref = jax.jit(M.apply, static_argnums=0)(graphdef, ref_params, tokens)
        for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
            mesh = S.make_mesh(shape)
            shardings = S.tree_shardings(axes, abstract, mesh)
            params = M.init_params(cfg, 0, shardings)
            for name, (p, a) in {k: (params[k], axes[k]) for k in params}.items():
                assert p.sharding.spec == S.logical_to_spec(a, p.shape, mesh), (name, p.sharding)
            if shape == (2, 2, 2):
                assert params["wqkv"].sharding.spec == P(None, "fsdp", None, "tensor", None)
                assert params["w_out"].sharding.spec == P(None, "tensor", "fsdp")
                # vocab 257 is not divisible by tensor=2: that dim stays replicated
                assert params["embed"].sharding.spec == P(None, "fsdp")
                assert len(params["wqkv"].addressable_shards[0].data.flatten()) * 4 == params["wqkv"].size
            batch = jax.device_put(tokens, S.batch_sharding(mesh))
            with jax.set_mesh(mesh):
                out = jax.jit(M.apply, static_argnums=0)(graphdef, params, batch)
            np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
            print(shape, "ok", out.sharding.spec)
    """, devices=8)


def test_cpu_kernel_attention_under_a_mesh():
    """The C++ attention runs per device shard (shard_map over batch and heads) and matches the
    reference attention in value and gradient on a (2, 2, 2) mesh."""
    run_python("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding
        from lm import sharding as S
        from lm.kernels import cpu

        mesh = S.make_mesh((2, 2, 2))
        spec = S.logical_to_spec(("batch", "length", "heads", "kv"), (4, 70, 4, 16), mesh)
        q, k, v = (jax.device_put(x, NamedSharding(mesh, spec))
                   for x in jax.random.normal(jax.random.key(0), (3, 4, 70, 4, 16)))
        ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
        loss = lambda fn: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), (0, 1, 2)))
        with jax.set_mesh(mesh):
            jaxpr = str(jax.make_jaxpr(cpu.causal_attention)(q, k, v))
            assert "shard_map" in jaxpr, jaxpr
            (value, grads), (ref_value, ref_grads) = loss(cpu.causal_attention)(q, k, v), loss(ref)(q, k, v)
        np.testing.assert_allclose(value, ref_value, rtol=1e-5)
        for g, r in zip(grads, ref_grads, strict=True):
            assert g.sharding.spec == spec, g.sharding
            np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)
    """, devices=8)
