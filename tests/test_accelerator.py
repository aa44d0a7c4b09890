"""Device checks for a GPU or TPU (`pytest -m accelerator`, run by `python -m lm.smoke`).

Skipped on CPU-only machines; `LM_ACCELERATOR_TESTS_ON_CPU=1` runs them on CPU anyway (the
cuDNN one excepted), to check the tests themselves where no accelerator is at hand.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import defaults

BACKEND = jax.default_backend()
pytestmark = [
    pytest.mark.accelerator,
    pytest.mark.skipif(BACKEND not in ("gpu", "tpu") and os.environ.get("LM_ACCELERATOR_TESTS_ON_CPU") != "1",
                       reason=f"needs a GPU or TPU (JAX backend: {BACKEND})"),
]
# bf16 against float32, per step of the same short run from the same initialisation.
BF16_LOSS_TOLERANCE = 0.05
# cuDNN against XLA attention, both bf16: max |difference| as a fraction of max |XLA value|.
CUDNN_LOGITS_TOLERANCE, CUDNN_GRADS_TOLERANCE = 2e-2, 5e-2


def tiny_config(dtype: str = "float32", attention: str = "auto", batch: int = 8, seq: int = 128):
    """Two layers of width 128 with head_dim 64 (a size cuDNN's flash attention takes)."""
    c = defaults()
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff = 128, 2, 2, 512
    c.model.dtype, c.model.attention, c.model.kernels = dtype, attention, "xla"
    c.data.seq_len, c.data.batch_size = seq, batch
    c.train.steps = 100
    c.optim.schedule, c.optim.peak_lr, c.optim.warmup_steps = "constant", 3e-3, 1
    return c


def random_batch(c, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, c.model.vocab_size, (c.data.batch_size, c.data.seq_len + 1)).astype(np.int32)


def train_losses(c, steps: int, devices=None) -> tuple[np.ndarray, dict]:
    """Losses of `steps` train steps on one fixed batch (memorising it), and the final params."""
    from lm import sharding
    from lm.train import Trainer

    mesh = sharding.make_mesh(c.mesh.shape, devices)
    trainer = Trainer(c, mesh)
    state = trainer.init_state()
    batch = jax.device_put(random_batch(c), trainer.batch_sharding)
    losses = []
    for _ in range(steps):
        state, metrics = trainer.train_step(state, batch)
        losses.append(metrics["loss"])
    return np.asarray(jax.device_get(losses)), jax.device_get(state["params"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_step_learns(dtype):
    """The compiled, sharded train step runs on the device and memorises a batch."""
    c = tiny_config(dtype)
    c.mesh.shape = (1, 1, 1)
    losses, _ = train_losses(c, 30, jax.devices()[:1])
    assert np.isfinite(losses).all(), losses
    assert losses[0] == pytest.approx(np.log(c.model.vocab_size), abs=0.3)  # near-uniform start
    assert losses[-1] < losses[0] - 1.0, losses


def test_bfloat16_tracks_float32():
    """bf16 compute (float32 params) follows the float32 run step for step."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        c = tiny_config(dtype)
        c.mesh.shape = (1, 1, 1)
        runs[dtype], _ = train_losses(c, 20, jax.devices()[:1])
    diff = np.abs(runs["bfloat16"] - runs["float32"])
    assert diff.max() < BF16_LOSS_TOLERANCE, (diff.max(), runs)


def _rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.skipif(BACKEND != "gpu", reason="cuDNN attention is GPU only")
def test_cudnn_attention_matches_xla():
    """The model with cuDNN attention equals the XLA attention in logits and every gradient."""
    from lm import model as model_lib

    tokens = jnp.asarray(random_batch(tiny_config(batch=4, seq=256)))
    out = {}
    for impl in ("xla", "cudnn"):
        cfg = tiny_config("bfloat16", impl).model
        graphdef, _, _ = model_lib.abstract_model(cfg)
        params = model_lib.init_params(cfg, 0)

        def loss(p, graphdef=graphdef):
            logits = model_lib.apply(graphdef, p, tokens[:, :-1])
            return model_lib.cross_entropy(logits, tokens[:, 1:])[0], logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        out[impl] = logits, grads
    assert _rel_error(out["cudnn"][0], out["xla"][0]) < CUDNN_LOGITS_TOLERANCE
    flat_cudnn = jax.tree_util.tree_leaves_with_path(out["cudnn"][1])
    for (path, g), g_ref in zip(flat_cudnn, jax.tree.leaves(out["xla"][1]), strict=True):
        assert _rel_error(g, g_ref) < CUDNN_GRADS_TOLERANCE, jax.tree_util.keystr(path)


@pytest.mark.parametrize("mesh", [(-1, 1, 1), (1, -1, 1)], ids=["data", "fsdp"])
def test_sharded_step_matches_one_device(mesh):
    """Data-parallel and FSDP steps over every local device equal the one-device run."""
    n = jax.local_device_count()
    if n < 2:
        pytest.skip("one local device")
    c = tiny_config(batch=2 * n)
    c.mesh.shape = (1, 1, 1)
    ref, ref_params = train_losses(c, 8, jax.local_devices()[:1])
    c.mesh.shape = mesh
    got, params = train_losses(c, 8, jax.local_devices())
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    for p, p_ref in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(p, p_ref, atol=1e-4)
