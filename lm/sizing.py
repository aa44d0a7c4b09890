"""Exact parameter counts, FLOPs per token (Hoffmann et al. 2022, App. F) and model shapes, from the
config alone (no model is built), so sweeps can be planned before anything is allocated."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import ml_collections

from lm.config import head_dim, model_defaults


@dataclass(frozen=True)
class ParamCount:
    total: int
    embedding: int  # input embedding + untied output projection (Kaplan et al. exclude them)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def count_params(m: ml_collections.ConfigDict) -> ParamCount:
    """Parameters of `lm.model.Transformer` for this config (no biases anywhere)."""
    count = _count(m.d_model, m.n_layers, m.n_heads * head_dim(m), m.d_ff, m.vocab_size,
                   m.activation == "swiglu", m.tied_embeddings)
    qk = 2 * m.n_layers * head_dim(m) if m.qk_norm else 0  # query and key norm scales
    return ParamCount(total=count.total + qk, embedding=count.embedding)


def _count(d: int, n_layers: int, hk: int, f: int, v: int, swiglu: bool, tied: bool,
           ) -> ParamCount:
    mlp = (3 if swiglu else 2) * d * f
    per_layer = 2 * d + 3 * d * hk + hk * d + mlp  # two norms, qkv, output, mlp
    embedding = v * d * (1 if tied else 2)
    return ParamCount(total=n_layers * per_layer + d + embedding, embedding=embedding)


def forward_flops_per_sequence(m: ml_collections.ConfigDict, seq_len: int) -> dict[str, float]:
    """Forward FLOPs of one sequence, term by term, as in Hoffmann et al. 2022 App. F (full s×s attention;
    the embedding gather counts 0, and `embedding_matmul`, its cost as a matmul, is for reference only)."""
    s, d, v, f = seq_len, m.d_model, m.vocab_size, m.d_ff
    h = m.n_heads
    hk = h * head_dim(m)
    per_layer = {
        "attention_qkv": 2 * 3 * s * d * hk,
        "attention_logits": 2 * s * s * hk,
        "attention_softmax": 3 * h * s * s,
        "attention_weighted_sum": 2 * s * s * hk,
        "attention_output": 2 * s * hk * d,
        "mlp": 2 * s * (3 if m.activation == "swiglu" else 2) * d * f,
    }
    terms = {name: float(m.n_layers * value) for name, value in per_layer.items()}
    terms["final_logits"] = float(2 * s * d * v)
    terms["embedding"] = 0.0
    terms["forward_total"] = sum(terms.values())
    terms["embedding_matmul"] = float(2 * s * v * d)
    return terms


def flops_per_token(m: ml_collections.ConfigDict, seq_len: int) -> float:
    """Training FLOPs per token: 3 × forward (the backward pass costs twice the forward)."""
    return 3 * forward_flops_per_sequence(m, seq_len)["forward_total"] / seq_len


def flops_per_token_6n(m: ml_collections.ConfigDict) -> float:
    """The 6·N approximation (N = total parameters), for comparison."""
    return 6.0 * count_params(m).total


def flops_per_token_palm(m: ml_collections.ConfigDict, seq_len: int) -> float:
    """PaLM's model-FLOPs convention 6·N + 12·L·T·d (used for MFU comparisons)."""
    return 6.0 * count_params(m).total + 12.0 * m.n_layers * seq_len * m.d_model


def shape_for_params(
    target: float,
    *,
    aspect_ratio: float = 64.0,
    head_dim: int = 64,
    ffn_ratio: float = 4.0,
    base: ml_collections.ConfigDict | None = None,
    count: str = "total",
    tolerance: float = 0.05,
) -> ml_collections.ConfigDict:
    """A model config with about `target` parameters (`count`: "total" or "non_embedding") and
    d_model / n_layers ≈ `aspect_ratio`; the search is described in docs/experiments.md."""
    if not target > 0 or not aspect_ratio > 0 or head_dim <= 0 or not ffn_ratio > 0:
        raise ValueError(
            f"shape_for_params(target={target}, aspect_ratio={aspect_ratio}, head_dim={head_dim},"
            f" ffn_ratio={ffn_ratio}): all must be positive")
    if count not in ("total", "non_embedding"):
        raise ValueError(f"count={count!r}: must be 'total' or 'non_embedding'")
    base = base if base is not None else model_defaults()
    swiglu = base.activation == "swiglu"
    log_tol = math.log1p(tolerance)
    best, best_key = None, None
    for n_layers in range(1, 1025):
        center = n_layers * aspect_ratio
        on_aspect = None
        for d in _widths(center):
            if heads_for(d, head_dim) != _nearest_heads(d, head_dim):
                continue  # a width whose heads would not be about head_dim wide
            f = d_ff_for(d, ffn_ratio)
            pc = _count(d, n_layers, d, f, base.vocab_size, swiglu, base.tied_embeddings)
            n = pc.total if count == "total" else pc.non_embedding
            if on_aspect is None and d >= center:
                on_aspect = n
            err = abs(math.log(n / target))
            aspect_err = abs(math.log(d / n_layers / aspect_ratio))
            key = (err > log_tol, aspect_err if err <= log_tol else err)
            if best_key is None or key < best_key:
                best, best_key = (d, n_layers), key
        if on_aspect is not None and on_aspect > 8 * target:
            break  # the on-aspect shape at this depth is too big already: deeper is worse
    return model_for_shape(base, *best, head_dim=head_dim, ffn_ratio=ffn_ratio)


def model_for_shape(base: ml_collections.ConfigDict, d_model: int, n_layers: int, *,
                    head_dim: int = 64, ffn_ratio: float = 4.0) -> ml_collections.ConfigDict:
    """`base` at this width and depth, with heads and d_ff by the one rule that planner and picker share."""
    cfg = ml_collections.ConfigDict(base.to_dict())
    cfg.d_model, cfg.n_layers, cfg.head_dim = d_model, n_layers, 0
    cfg.n_heads = heads_for(d_model, head_dim)
    cfg.d_ff = d_ff_for(d_model, ffn_ratio)
    return cfg


def _nearest_heads(d_model: int, head_dim: int) -> int:
    return max(1, round(d_model / head_dim))


def heads_for(d_model: int, head_dim: int) -> int:
    """About d_model / head_dim heads, fewer until they split d_model into equal heads of even width."""
    if d_model <= 0 or d_model % 2:
        raise ValueError(f"d_model = {d_model}: heads need an even d_model > 0")
    h = _nearest_heads(d_model, head_dim)
    while d_model % h or (d_model // h) % 2:
        h -= 1
    return h


def d_ff_for(d_model: int, ffn_ratio: float) -> int:
    """ffn_ratio·d_model rounded to a multiple of 8, whatever the activation: the one width rule
    (a SwiGLU config that wants a GELU MLP's cost asks for 2/3 of its ratio, e.g. 8/3)."""
    return max(8, round(ffn_ratio * d_model / 8) * 8)


def _widths(center: float) -> list[int]:
    """Candidate widths up to 1.5·center: even below 64 (tiny models), multiples of 8 above."""
    return list(range(2, 64, 2)) + list(range(64, max(64, int(center * 1.5)) + 1, 8))


def main(argv: list[str] | None = None) -> None:
    """Print model shapes for target sizes with their exact counts and FLOPs per token
    (`argv`: the arguments, default this process's)."""
    from absl import flags

    from lm import cli
    from lm.config import ACTIVATIONS, ConfigError

    flags.DEFINE_list("targets", [f"{10 ** (5 + k / 2):.3g}" for k in range(9)],
                      "parameter counts, comma-separated")
    flags.DEFINE_float("aspect_ratio", 64.0, "d_model / n_layers")
    flags.DEFINE_integer("seq_len", 1024, "context, for the FLOPs per token")
    flags.DEFINE_integer("vocab_size", 257, "vocabulary")
    flags.DEFINE_string("activation", "gelu", " or ".join(ACTIVATIONS))

    def body() -> None:
        f = flags.FLAGS
        try:
            targets = [float(t) for t in f.targets]
        except ValueError:
            raise ConfigError(f"--targets={','.join(f.targets)} is not allowed: expected numbers such as "
                              "1e6,1e7") from None
        rules = (("targets", ",".join(f.targets), targets and all(1 <= t < math.inf for t in targets),
                  "must be finite parameter counts >= 1"),
                 ("aspect_ratio", f.aspect_ratio, 0 < f.aspect_ratio < math.inf,
                  "must be a finite number > 0"),
                 ("seq_len", f.seq_len, f.seq_len >= 1, "must be a positive integer"),
                 ("vocab_size", f.vocab_size, f.vocab_size >= 1, "must be a positive integer"),
                 ("activation", f.activation, f.activation in ACTIVATIONS,
                  f"must be one of {', '.join(ACTIVATIONS)}"))
        for name, value, ok, rule in rules:
            if not ok:
                raise ConfigError(f"--{name}={value} is not allowed: {rule}")
        table(targets, f.aspect_ratio, f.seq_len, f.vocab_size, f.activation)

    cli.run(body, ["lm.sizing", *(sys.argv[1:] if argv is None else argv)])


def table(targets: list[float], aspect_ratio: float, seq_len: int, vocab_size: int, activation: str) -> None:
    """One line per target: the picked shape, its exact counts and FLOPs per token."""
    base = model_defaults()
    base.vocab_size, base.activation = vocab_size, activation
    print(f"{'target':>9} {'d_model':>7} {'layers':>6} {'heads':>5} {'d_ff':>6} {'N':>12} "
          f"{'N non-emb':>12} {'FLOPs/token':>12} {'/ 6N':>6}")
    for target in targets:
        m = shape_for_params(target, aspect_ratio=aspect_ratio, base=base)
        pc, fpt = count_params(m), flops_per_token(m, seq_len)
        print(f"{target:9.2e} {m.d_model:7d} {m.n_layers:6d} {m.n_heads:5d} {m.d_ff:6d} "
              f"{pc.total:12,d} {pc.non_embedding:12,d} {fpt:12.4e} {fpt / (6 * pc.total):6.3f}")


if __name__ == "__main__":
    main()
