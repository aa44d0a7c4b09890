"""`python -m lm.analysis --path=PATH [--out=DIR] [--n=total|non_embedding] [--bootstrap=1000] ...`"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lm.config import ConfigError


def budgets(items: list[str] | None) -> tuple[float, ...] | None:
    """--budgets=1e18,1e20 as numbers (None: the default budgets)."""
    try:
        return tuple(float(x) for x in items) if items else None
    except ValueError:
        raise ConfigError(f"--budgets={','.join(items)!r} is not allowed: expected comma-separated "
                          "numbers such as 1e18,1e19") from None


def main(argv: list[str]) -> None:
    from absl import flags

    from lm import analysis, cli
    from lm.analysis.load import N_CHOICES
    from lm.process import compilation_cache

    flags.DEFINE_string("path", None, "a sweep directory, or a CSV/Parquet table of N, D, loss [, C]")
    flags.DEFINE_string("out", None, "output directory (default: the sweep dir / the table's dir)")
    flags.DEFINE_enum("n", "total", list(N_CHOICES), "which N the fits use")
    flags.DEFINE_integer("bootstrap", 1000, "bootstrap resamples (0: none)")
    flags.DEFINE_integer("seed", 0, "bootstrap seed")
    flags.DEFINE_list("budgets", None, "prediction budgets, e.g. 1e18,1e20 (default 1e18…1e25)")
    flags.DEFINE_float("tolerance", 0.05, "bare tables: relative spread of C grouped into one budget")

    def body() -> None:
        f = flags.FLAGS
        if not f.path:
            raise ConfigError("--path is required: a sweep directory or a CSV/Parquet table, "
                              "e.g. --path=sweeps/tiny")
        start = time.perf_counter()
        compilation_cache()  # a second analysis loads the fit's programs
        fits = analysis.run(f.path, f.out, n=f.n, bootstrap=f.bootstrap, seed=f.seed,
                            budgets=budgets(f.budgets), tolerance=f.tolerance)
        out = Path(f.out) if f.out else (Path(f.path) if Path(f.path).is_dir() else Path(f.path).parent)
        print(analysis.summary(fits))
        print(f"wrote {out / 'fits.json'}, {out / 'report.md'} and {len(fits['figures'])} figures "
              f"in {time.perf_counter() - start:.1f}s")

    cli.run(body, argv)


if __name__ == "__main__":
    main(sys.argv)
