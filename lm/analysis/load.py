"""Results (a sweep directory or a CSV/Parquet table) → one DataFrame with a row per (run, point); rows
left out of the fits stay, with `included = False` and a `reason`, so the report can list them. A frame
saved with `to_parquet` or `to_csv(index=False)` loads back as the same frame."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from lm.config import ConfigError
from lm.files import FileError, read_json, run_dir

N_CHOICES = ("total", "non_embedding")
REQUIRED = ("N", "D", "loss")
COLUMNS = ("run", "replicate", "point", "step", "budget", "status", "schedule", "included", "reason", "N",
           "N_total", "N_non_embedding", "D", "C", "C_6nd", "loss", "flops_per_token", "config_hash")
FLOATS = ("budget", "N", "N_total", "N_non_embedding", "D", "C", "C_6nd", "loss", "flops_per_token")
TEXT = ("run", "point", "status", "schedule", "reason")  # "" when missing; config_hash stays missing
POINTS = ("final", "eval")
# Counts every plan entry and every completed result.json holds, and the type of each key the loader reads.
COUNTS = ("n_params", "n_params_non_embedding", "tokens", "flops", "flops_6nd")
TYPES = {"name": str, "status": str, "config_hash": str, "steps": int, "diverged_step": int, "replicate": int,
         **dict.fromkeys(("budget", *COUNTS, "flops_per_token", "eval_loss"), float)}


def check_n(n: str) -> None:
    """`n` names which parameter count is N."""
    if n not in N_CHOICES:
        raise ConfigError(f"n = {n!r} is not allowed: must be one of {', '.join(N_CHOICES)}")


def load(path: str | Path, n: str = "total") -> pd.DataFrame:
    """Load a sweep directory or a CSV/Parquet table; `n` picks which parameter count is `N`."""
    check_n(n)
    path = Path(path)
    if path.is_dir():
        return load_sweep(path, n)
    if path.is_file():
        return load_table(path, n)
    raise FileError(f"{path}: no such sweep directory or CSV/Parquet table")


def is_type(value: object, kind: type) -> bool:
    """JSON type check: float takes any number, int only integers, and a bool is neither."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int | float) if kind is float else isinstance(value, kind)


def _float(x: object) -> float:
    """A JSON number as a float; null, or anything but a number, is NaN (so it never enters a fit)."""
    return float(x) if is_type(x, float) else float("nan")


def _problem(obj: object, required: tuple[str, ...] = ()) -> str:
    """What makes a plan entry or a result.json unusable ('' when nothing): not an object, a required
    key missing or null, or a key the loader reads holding the wrong type."""
    if not isinstance(obj, dict):
        return f"is not a JSON object (found {type(obj).__name__})"
    missing = [k for k in required if obj.get(k) is None]
    if missing:
        return f"missing {', '.join(map(repr, missing))}"
    for key, kind in TYPES.items():
        value = obj.get(key)
        if value is not None and not is_type(value, kind):
            what = {float: "a number", int: "an integer", str: "a string"}[kind]
            return f"{key!r} is {value!r}, not {what}"
    return ""


def _plan(sweep: Path) -> dict[str, dict]:
    """The runs of plan.json by name ({} without one); a damaged plan stops the analysis, naming it."""
    path = sweep / "plan.json"
    if not path.exists():
        return {}
    runs = read_json(path, dict, ["runs"])["runs"]
    if not isinstance(runs, list):
        raise FileError(f"{path}: 'runs' is a {type(runs).__name__}, not a list of runs")
    for i, r in enumerate(runs):
        problem = _problem(r, ("name", "budget", *COUNTS))
        if problem:
            raise FileError(f"{path}: runs[{i}] {problem}")
    return {r["name"]: r for r in runs}


def _schedule(plan: dict) -> str:
    """The learning-rate schedule a run was planned with ('' without plan.json): approach 1 takes
    a WSD run's end point, not its curve."""
    config = plan.get("config")
    optim = config.get("optim") if isinstance(config, dict) else None
    schedule = optim.get("schedule") if isinstance(optim, dict) else None
    return schedule if isinstance(schedule, str) else ""


def _result(path: Path) -> tuple[dict | None, str]:
    """A run's result.json (None when there is none) and what is wrong with it ('' when nothing)."""
    if not path.exists():
        return None, ""
    try:
        result = read_json(path, dict, ["status"])
    except FileError as e:
        return None, str(e)
    problem = _problem(result, COUNTS if result["status"] == "completed" else ())
    return (None, f"{path}: {problem}") if problem else (result, "")


def _eval_lines(path: Path) -> list[dict]:
    """The eval lines of a metrics.jsonl (objects with an eval_loss), skipping torn or foreign lines."""
    if not path.exists():
        return []
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "eval_loss" in rec:
            lines.append(rec)
    return lines


def _positive(*values: float) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


def _final_reason(status: str, result: dict | None, loss: float, *counts: float) -> str:
    """Why a run's final point is left out of fits ('' when it is not)."""
    if result is None:
        return "unfinished: no result.json"
    if status != "completed":
        step = result.get("diverged_step")
        return f"status {status}" + (f" at step {step}" if step is not None else "")
    if not _positive(loss):
        return "no finite positive eval_loss"
    if not _positive(*counts):
        return "parameters, tokens or FLOPs not positive"
    return ""


def load_sweep(sweep: Path, n: str = "total") -> pd.DataFrame:
    """Every planned or finished run of a sweep: its final point and its eval curve. A damaged plan.json
    is an error; a damaged result.json leaves its run out, with a warning and the reason in the frame."""
    plans = _plan(sweep)
    found = sorted(p.parent.name for p in (sweep / "runs").glob("*/result.json"))
    names = list(plans) + [x for x in found if x not in plans]
    if not names:
        raise FileError(f"{sweep}: no plan.json and no runs/*/result.json")
    rows = []
    for name in names:
        plan = plans.get(name, {})
        workdir = run_dir(sweep, name)
        result, damage = _result(workdir / "result.json")
        if damage:
            warnings.warn(f"{damage}; run {name} left out", stacklevel=2)
        src = {**plan, **(result or {})}
        status = "damaged" if damage else result["status"] if result else "unfinished"
        n_total, n_ne = _float(src.get("n_params")), _float(src.get("n_params_non_embedding"))
        tokens, flops = _float(src.get("tokens")), _float(src.get("flops"))
        fpt = _float(src["flops_per_token"]) if "flops_per_token" in src else (
            flops / tokens if _positive(tokens) else float("nan"))
        meta = {"run": name, "replicate": plan.get("replicate", 0), "budget": _float(plan.get("budget")),
                "status": status,
                "schedule": _schedule(plan),
                "N_total": n_total, "N_non_embedding": n_ne, "N": n_total if n == "total" else n_ne,
                "flops_per_token": fpt, "config_hash": (result or {}).get("config_hash")}
        loss = _float(result.get("eval_loss")) if result else float("nan")
        reason = f"damaged: {damage}" if damage else _final_reason(status, result, loss, meta["N"], tokens,
                                                                     flops)
        rows.append({**meta, "point": "final", "step": src.get("steps"), "D": tokens, "C": flops,
                     "C_6nd": _float(src.get("flops_6nd")), "loss": loss, "included": not reason,
                     "reason": reason})
        for rec in _eval_lines(workdir / "metrics.jsonl"):
            e_loss, e_tokens, e_flops = (_float(rec.get(k)) for k in ("eval_loss", "tokens", "flops"))
            e_reason = reason or ("" if _positive(e_loss, e_tokens, e_flops)
                                  else "non-finite eval_loss, tokens or flops")
            step = rec.get("step")
            rows.append({**meta, "point": "eval", "step": step if is_type(step, int) else None, "D": e_tokens,
                         "C": e_flops, "C_6nd": 6 * meta["N"] * e_tokens, "loss": e_loss,
                         "included": not e_reason, "reason": e_reason})
    return _frame(pd.DataFrame(rows, columns=list(COLUMNS)))


def _text(values, missing: str | None = "") -> list:
    """Strings, with `missing` for absent values: the same column whether built here or read from a file."""
    return [missing if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in values]


def _frame(df: pd.DataFrame) -> pd.DataFrame:
    """The loader's columns and dtypes, so a frame read back from a file equals the one saved."""
    df = df[list(COLUMNS)].reset_index(drop=True)
    for c in TEXT:
        df[c] = _text(df[c])
    df["config_hash"] = _text(df["config_hash"], None)
    df["included"] = df["included"].astype(bool)
    df["replicate"] = df["replicate"].astype(np.int64)
    df["step"] = pd.array([None if pd.isna(s) else int(s) for s in df["step"]], dtype="Int64")
    for c in FLOATS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(np.float64)
    return df


def load_table(path: Path, n: str = "total") -> pd.DataFrame:
    """A CSV/Parquet table: bare final points (N, D, loss; optional C, budget, run, replicate,
    N_non_embedding) or
    a frame of this loader saved to a file; unreadable, empty or incomplete tables name the file."""
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv", ".txt"):
        raise FileError(f"{path}: expected a .csv or .parquet table, or a sweep directory")
    try:
        table = (pd.read_parquet(path) if suffix == ".parquet" else
                 pd.read_csv(path, dtype=dict.fromkeys((*TEXT, "config_hash"), str)))
    except pd.errors.EmptyDataError:
        raise FileError(f"{path}: empty file; expected a table with columns N, D, loss") from None
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise FileError(f"{path}: not a readable {suffix[1:]} table ({e})") from None
    if table.empty:
        raise FileError(f"{path}: no rows (columns {list(table.columns)}); expected one row per point")
    return from_table(table, n, source=str(path))


def _flags(values: pd.Series, source: str) -> np.ndarray:
    """An `included` column as booleans (True/False, any case, or 1/0)."""
    if values.dtype == bool:
        return values.to_numpy()
    words = {"true": True, "1": True, "false": False, "0": False}
    out = [words.get(str(v).strip().lower()) for v in values]
    if None in out:
        i = out.index(None)
        raise FileError(f"{source}: column 'included' must be True or False, but row {i} has {values[i]!r}")
    return np.array(out, dtype=bool)


def from_table(table: pd.DataFrame, n: str = "total", source: str = "table") -> pd.DataFrame:
    """Check a table of points and give it the loader's columns: a bare one (N, D, loss; C = 6·N·D,
    every row a final point) or a loader frame read back (its N_total, point, included, reason kept)."""
    check_n(n)
    table = table.reset_index(drop=True)

    def column(name: str, default):
        return table[name] if name in table.columns else default

    total = "N_total" if "N_total" in table.columns else "N"
    n_col = total if n == "total" else "N_non_embedding"
    missing = [c for c in dict.fromkeys((n_col, "D", "loss")) if c not in table.columns]
    if missing:
        raise FileError(f"{source} lacks column(s) {missing}; required: N, D, loss "
                        f"(optional: C, budget, run, replicate{', N_non_embedding' if n != 'total' else ''})")
    included = _flags(table["included"], source) if "included" in table.columns else np.ones(len(table), bool)
    if "point" in table.columns:
        odd = ~table["point"].isin(POINTS).to_numpy()
        if odd.any():
            i = int(np.flatnonzero(odd)[0])
            raise FileError(f"{source}: column 'point' must be 'final' or 'eval', but row {i} has "
                            f"{table['point'][i]!r}")
    replicate = pd.to_numeric(column("replicate", np.zeros(len(table))), errors="coerce")
    bad = np.flatnonzero(~((replicate >= 0) & (replicate == np.round(replicate))))
    if len(bad):
        raise FileError(f"{source}: column 'replicate' must be an integer >= 0 (the seed replicate), but row "
                        f"{bad[0]} has {table['replicate'][bad[0]]!r}")
    values = {}
    for col in dict.fromkeys((n_col, total, "D", "loss", *(["C"] if "C" in table.columns else []))):
        values[col] = pd.to_numeric(table[col], errors="coerce").to_numpy(np.float64)
        bad = np.flatnonzero(included & ~(np.isfinite(values[col]) & (values[col] > 0)))
        if len(bad):
            raise FileError(f"{source}: column {col!r} must be finite and > 0, but row {bad[0]} has "
                            f"{table[col][bad[0]]} ({len(bad)} bad row(s))")
    N, D = values[n_col], values["D"]
    C = values.get("C", 6 * N * D)
    return _frame(pd.DataFrame({
        "run": column("run", [f"row{i}" for i in range(len(table))]), "replicate": replicate,
        "point": column("point", "final"),
        "step": column("step", None), "budget": column("budget", np.nan),
        "status": column("status", "completed"), "schedule": column("schedule", ""),
        "included": included, "reason": column("reason", ""),
        "N": N, "N_total": values[total], "N_non_embedding": column("N_non_embedding", np.nan),
        "D": D, "C": C, "C_6nd": column("C_6nd", 6 * N * D), "loss": values["loss"],
        "flops_per_token": column("flops_per_token", C / D), "config_hash": column("config_hash", None),
    }))


def fit_points(df: pd.DataFrame) -> pd.DataFrame:
    """The final points that enter fits, checked (finite, positive N, D, loss); C = 6·N·D when absent."""
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
    if "C" not in pts.columns:
        pts = pts.assign(C=6 * pts["N"].to_numpy(np.float64) * pts["D"].to_numpy(np.float64))
    return pts


def labelled(pts: pd.DataFrame) -> bool:
    """Whether every point carries its budget label (else budgets are C grouped within a tolerance)."""
    return "budget" in pts.columns and bool(np.isfinite(pts["budget"].to_numpy(np.float64)).all())


def group_budgets(pts: pd.DataFrame, tolerance: float = 0.05) -> np.ndarray:
    """A budget per point: the sweep's label, or (bare tables) C grouped within a relative tolerance."""
    if labelled(pts):
        return pts["budget"].to_numpy(np.float64)
    C = pts["C"].to_numpy(np.float64)
    order = np.argsort(C)
    labels = np.empty_like(C)
    start, members = C[order[0]], []
    for i in order:
        if C[i] > start * (1 + tolerance):
            labels[members] = np.exp(np.mean(np.log(C[members])))
            start, members = C[i], []
        members.append(i)
    labels[members] = np.exp(np.mean(np.log(C[members])))
    return labels
