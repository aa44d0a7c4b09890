"""Results (a sweep directory or a CSV/Parquet table) → one DataFrame with a row per (run, point); rows
left out of the fits stay, with `included = False` and a `reason`, so the report can list them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from lm.files import run_dir

N_CHOICES = ("total", "non_embedding")
REQUIRED = ("N", "D", "loss")
COLUMNS = ("run", "point", "step", "budget", "status", "included", "reason", "N", "N_total",
           "N_non_embedding", "D", "C", "C_6nd", "loss", "flops_per_token", "config_hash")


def load(path: str | Path, n: str = "total") -> pd.DataFrame:
    """Load a sweep directory or a CSV/Parquet table; `n` picks which parameter count is `N`."""
    if n not in N_CHOICES:
        raise ValueError(f"n must be one of {N_CHOICES}, got {n!r}")
    path = Path(path)
    if path.is_dir():
        return load_sweep(path, n)
    if path.is_file():
        return load_table(path, n)
    raise ValueError(f"{path} is neither a sweep directory nor a CSV/Parquet file")


def _float(x: object) -> float:
    """JSON number or null → float (null is NaN)."""
    return float("nan") if x is None else float(x)


def _read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _eval_lines(path: Path) -> list[dict]:
    """The eval lines of a metrics.jsonl (those with an eval_loss), skipping a torn last line."""
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            rec = json.loads(text)
        except json.JSONDecodeError:
            continue
        if "eval_loss" in rec:
            lines.append(rec)
    return lines


def _final_reason(status: str, result: dict | None, loss: float) -> str:
    """Why a run's final point is left out of fits ('' when it is not)."""
    if result is None:
        return "unfinished: no result.json"
    if status != "completed":
        step = result.get("diverged_step")
        return f"status {status}" + (f" at step {step}" if step is not None else "")
    if not (math.isfinite(loss) and loss > 0):
        return "no finite positive eval_loss"
    return ""


def load_sweep(sweep: Path, n: str = "total") -> pd.DataFrame:
    """Every planned or finished run of a sweep: its final point and its eval curve."""
    planned = _read_json(sweep / "plan.json")["runs"] if (sweep / "plan.json").exists() else []
    plans = {r["name"]: r for r in planned}
    found = sorted(p.parent.name for p in (sweep / "runs").glob("*/result.json"))
    names = list(plans) + [x for x in found if x not in plans]
    if not names:
        raise ValueError(f"{sweep} has no plan.json and no runs/*/result.json")
    rows = []
    for name in names:
        plan = plans.get(name, {})
        workdir = run_dir(sweep, name)
        result = _read_json(workdir / "result.json") if (workdir / "result.json").exists() else None
        src = result or plan
        status = result.get("status", "unknown") if result else "unfinished"
        n_total, n_ne = _float(src.get("n_params")), _float(src.get("n_params_non_embedding"))
        tokens, flops = _float(src.get("tokens")), _float(src.get("flops"))
        fpt = _float(src.get("flops_per_token")) if "flops_per_token" in src else flops / tokens
        meta = {"run": name, "budget": _float(plan.get("budget")), "status": status,
                "N_total": n_total, "N_non_embedding": n_ne, "N": n_total if n == "total" else n_ne,
                "flops_per_token": fpt, "config_hash": (result or {}).get("config_hash")}
        loss = _float(result.get("eval_loss")) if result else float("nan")
        reason = _final_reason(status, result, loss)
        rows.append({**meta, "point": "final", "step": src.get("steps"), "D": tokens, "C": flops,
                     "C_6nd": _float(src.get("flops_6nd")), "loss": loss, "included": not reason,
                     "reason": reason})
        for rec in _eval_lines(workdir / "metrics.jsonl"):
            e_loss, e_tokens = _float(rec.get("eval_loss")), _float(rec.get("tokens"))
            e_reason = reason or ("" if math.isfinite(e_loss) and e_loss > 0 else "non-finite eval_loss")
            rows.append({**meta, "point": "eval", "step": rec.get("step"), "D": e_tokens,
                         "C": _float(rec.get("flops")), "C_6nd": 6 * meta["N"] * e_tokens, "loss": e_loss,
                         "included": not e_reason, "reason": e_reason})
    return _frame(rows)


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df["included"] = df["included"].astype(bool)
    for c in ("budget", "N", "N_total", "N_non_embedding", "D", "C", "C_6nd", "loss", "flops_per_token"):
        df[c] = df[c].astype(np.float64)
    return df


def load_table(path: Path, n: str = "total") -> pd.DataFrame:
    """A CSV/Parquet table of final points: N, D, loss required; C (default 6·N·D), budget, run optional."""
    if path.suffix.lower() == ".parquet":
        table = pd.read_parquet(path)
    elif path.suffix.lower() in (".csv", ".txt"):
        table = pd.read_csv(path)
    else:
        raise ValueError(f"{path}: expected a .csv or .parquet table, or a sweep directory")
    return from_table(table, n, source=str(path))


def from_table(table: pd.DataFrame, n: str = "total", source: str = "table") -> pd.DataFrame:
    """Check a table of (N, D, loss[, C, budget, run]) and give it the loader's columns."""
    n_col = "N" if n == "total" else "N_non_embedding"
    missing = [c for c in (*REQUIRED, n_col) if c not in table.columns]
    if missing:
        raise ValueError(f"{source} lacks column(s) {missing}; required: N, D, loss "
                         f"(optional: C, budget, run{', N_non_embedding' if n != 'total' else ''})")
    for col in (n_col, "D", "loss", *(["C"] if "C" in table.columns else [])):
        values = pd.to_numeric(table[col], errors="coerce").to_numpy(np.float64)
        bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
        if len(bad):
            i = bad[0]
            raise ValueError(f"{source}: column {col!r} must be finite and > 0, but row {i} has "
                             f"{table[col].iloc[i]} ({len(bad)} bad row(s))")
    N = table[n_col].to_numpy(np.float64)
    D = table["D"].to_numpy(np.float64)
    C = table["C"].to_numpy(np.float64) if "C" in table.columns else 6 * N * D
    frame = pd.DataFrame({
        "run": table["run"].astype(str) if "run" in table.columns else [f"row{i}" for i in range(len(table))],
        "point": "final", "step": None,
        "budget": table["budget"].to_numpy(np.float64) if "budget" in table.columns else np.nan,
        "status": "completed", "included": True, "reason": "",
        "N": N, "N_total": table["N"].to_numpy(np.float64),
        "N_non_embedding": table["N_non_embedding"].to_numpy(np.float64)
        if "N_non_embedding" in table.columns else np.nan,
        "D": D, "C": C, "C_6nd": 6 * N * D, "loss": table["loss"].to_numpy(np.float64),
        "flops_per_token": C / D, "config_hash": None,
    })
    return _frame(frame.to_dict("records"))


def fit_points(df: pd.DataFrame) -> pd.DataFrame:
    """The final points that enter fits, checked: finite and positive N, D, loss."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"frame lacks column(s) {missing}; required: {list(REQUIRED)}")
    pts = df
    if "point" in df.columns:
        pts = pts[pts["point"] == "final"]
    if "included" in df.columns:
        pts = pts[pts["included"].astype(bool)]
    for col in REQUIRED:
        values = pd.to_numeric(pts[col], errors="coerce").to_numpy(np.float64)
        bad = ~(np.isfinite(values) & (values > 0))
        if bad.any():
            raise ValueError(f"column {col!r} must be finite and > 0 for fitted points, got "
                             f"{pts[col].iloc[int(np.flatnonzero(bad)[0])]!r}")
    return pts
