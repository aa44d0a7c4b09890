"""`python -m lm.analysis PATH [--out DIR] [--n total|non_embedding] [--bootstrap 1000] ...`"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lm import analysis


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lm.analysis", description=__doc__)
    p.add_argument("path", help="a sweep directory, or a CSV/Parquet table with columns N, D, loss [, C]")
    p.add_argument("--out", default=None, help="output directory (default: the sweep dir / the table's dir)")
    p.add_argument("--n", choices=("total", "non_embedding"), default="total", help="which N the fits use")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budgets", default=None, help="prediction budgets, e.g. 1e18,1e20 (default 1e18…1e25)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="bare tables: relative spread of C grouped into one budget")
    a = p.parse_args(argv)
    if a.bootstrap < 0:
        sys.exit(f"error: --bootstrap={a.bootstrap}: must be >= 0")
    try:
        budgets = tuple(float(x) for x in a.budgets.split(",")) if a.budgets else None
    except ValueError:
        sys.exit(f"error: --budgets={a.budgets!r}: expected comma-separated numbers such as 1e18,1e19")
    start = time.perf_counter()
    try:
        fits = analysis.run(a.path, a.out, n=a.n, bootstrap=a.bootstrap, seed=a.seed, budgets=budgets,
                            tolerance=a.tolerance)
    except ValueError as e:
        sys.exit(f"error: {e}")
    out = Path(a.out) if a.out else (Path(a.path) if Path(a.path).is_dir() else Path(a.path).parent)
    print(analysis.summary(fits))
    print(f"wrote {out / 'fits.json'}, {out / 'report.md'} and {len(fits['figures'])} figures "
          f"in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
