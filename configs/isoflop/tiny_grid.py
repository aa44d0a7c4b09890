"""The tiny sweep as a WSD grid: the tiny ladder's sizes × budgets from 3e11 to 3e12 FLOPs.

One warmup-stable-decay trunk per size, to its largest token count, with a 1-sqrt cooldown branch
at every smaller one (Hägele et al. 2024). The tiny budgets (3e11, 1e12, 3e12) get fill budgets
between them, so a size's token counts are at most sqrt(2) apart; each budget's line holds the
ladder sizes within a factor size_span of sqrt(C / (6 r)), which at the three tiny budgets are the
tiny sweep's own five sizes, so those 15 runs have cosine twins (same N and D). See the grid
section of docs/experiments.md for what this costs and what it measured:

    python -m experiments.isoflop --config=configs/isoflop/tiny_grid.py --dry_run
"""

import ml_collections

from configs.isoflop import tiny


def get_config() -> ml_collections.ConfigDict:
    c = tiny.get_config("untuned")
    c.name = "tiny_grid"
    c.sweep_dir = "sweeps/tiny_grid"
    c.mode = "grid"
    c.shapes = ()  # grid mode: the sizes are grid.shapes, each budget's line those in its window
    c.grid.shapes = "16x1,16x2,24x2,32x2,48x2,64x2,80x3"  # the tiny sweep's ladder
    # The window of budget C: a factor size_span around sqrt(C / (6 r)); r = 82 and a span of 13 put
    # the tiny sweep's five sizes on each of its three budgets' lines.
    c.tokens_per_param = 82.0
    c.size_span = 13.0
    # A 10 % cooldown keeps training FLOPs under the cosine tiny sweep's (the trunks alone cost 79 %
    # of it); 1-sqrt is the shape that matches cosine at short cooldowns.
    c.cooldown_frac = 0.1
    c.train.optim.cooldown_shape = "1-sqrt"
    return c
