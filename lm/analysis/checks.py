"""When a fit should not be trusted: the criteria of docs/analysis.md, each a one-line warning that the
summary prints as `unreliable: ...` and the report marks **Unreliable**."""

from __future__ import annotations

import math

# Compute-optimal exponents of language models in the literature lie between about 0.45 and 0.75
# (Kaplan et al. 2020, Hoffmann et al. 2022, DeepSeek-AI 2024): an estimate, or an end of its 95 %
# interval, outside this wider range says the points do not determine the trend.
PLAUSIBLE = (0.2, 0.8)
MIN_BUDGETS = 3  # a power law in C through two budgets has nothing left to check it
DISAGREE = 2.0  # approaches 2 and 3 whose N_opt at the next budget differ by more than this factor
MIN_ENVELOPE_SIZES = 4  # approach 1: fewer distinct sizes along the envelope make a staircase


def exponents(fit: dict) -> list[str]:
    """a or b, or an end of its 95 % interval, outside PLAUSIBLE (a failed, nan interval is ignored)."""
    lo, hi = PLAUSIBLE
    found = []
    for k in ("a", "b"):
        ci = [v for v in (fit.get("ci") or {}).get(k) or [] if v is not None and math.isfinite(v)]
        if not (math.isfinite(fit[k]) and lo <= fit[k] <= hi):
            found.append(f"{k} = {fit[k]:.3f}")
        elif not all(lo <= v <= hi for v in ci):
            found.append(f"{k}'s 95 % interval {ci[0]:.3f}–{ci[1]:.3f}")
    if not found:
        return []
    return [f"exponents outside {lo:g}–{hi:g} (where language models' compute-optimal exponents lie): "
            f"{', '.join(found)}; these points do not determine them"]


def budgets(n: int) -> list[str]:
    """Fewer than MIN_BUDGETS budgets behind a power law in C."""
    if n >= MIN_BUDGETS:
        return []
    return [f"only {n} budget{'s' if n != 1 else ''}: a power law in C needs at least {MIN_BUDGETS} "
            "to be checked, not just drawn through them"]


def envelope(sizes: list[float]) -> list[str]:
    """Approach 1's envelope visits fewer than MIN_ENVELOPE_SIZES sizes: N along it is a staircase of
    the size ladder's steps, and a power law through it measures where the steps fall, not a trend."""
    distinct = sorted(set(sizes))
    if len(distinct) >= MIN_ENVELOPE_SIZES:
        return []
    return [f"the envelope visits only {len(distinct)} sizes ({', '.join(f'{n:.3g}' for n in distinct)}): "
            "a and b trace the size ladder's steps; sizes closer together would resolve the trend"]


def extrapolation(C: float, lo: float, hi: float) -> list[str]:
    """A budget further beyond the largest fitted one (in log C) than the fitted budgets span."""
    ahead, span = math.log10(C / hi), math.log10(hi / lo)
    if ahead <= span + 1e-9:
        return []
    return [f"{C:.3g} is {ahead:.1f} decades beyond the largest budget, more than the {span:.1f} "
            "the fitted budgets span"]


def disagreement(n_opt: float, other: float, other_name: str) -> list[str]:
    """Two approaches' N_opt at one budget more than DISAGREE apart."""
    ratio = n_opt / other if other > 0 else math.inf
    if 1 / DISAGREE <= ratio <= DISAGREE:
        return []
    return [f"{other_name} gives N_opt ≈ {other:.3g}, more than a factor {DISAGREE:g} apart"]
