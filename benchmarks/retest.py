"""How much of a target's held-out error is the host's, and how much the model's?

Takes two ``dynas validate`` tables of the same configs (same ``--seed`` and ``--count``),
measured at different times in pairs (``--host-check pairs``), and the target they were
scored against, and prints :func:`dynas.predictors.calibration.retest_summary` per batch
size: the noise of one measurement, the spread of the model's error in each table, the
correlation of those errors between the tables (near 1: the model's; near 0: the host's), and
the share of networks within +/-10 % in each table and against the mean of both.

    dynas validate --target T.toml --seed S --count 40 --host-check pairs --csv first.csv
    dynas validate --target T.toml --seed S --count 40 --host-check pairs --csv second.csv
    python benchmarks/retest.py --target T.toml first.csv second.csv
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from dynas.errors import DynasError
from dynas.predictors.calibration import retest_summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="target file the tables are scored against")
    ap.add_argument("first", help="validation CSV")
    ap.add_argument("second", help="validation CSV of the same configs, measured again")
    args = ap.parse_args(argv)
    try:
        table = retest_summary(pd.read_csv(args.first), pd.read_csv(args.second), args.target)
    except (DynasError, OSError) as exc:
        print(f"retest: {exc}", file=sys.stderr)
        return 2
    print(f"{table['networks'].sum()} networks in both tables")
    print("batch  networks  noise %  error std % (1st, 2nd)  corr  within 10 % (1st, 2nd, mean of both)")
    for r in table.itertuples(index=False):
        print(
            f"{r.batch_size:5d}  {r.networks:8d}  {r.noise_pct:7.2f}  {r.error_std_pct_first:10.2f} "
            f"{r.error_std_pct_second:6.2f}           {r.error_corr:5.2f}  {100 * r.within_10pct_first:5.0f} "
            f"{100 * r.within_10pct_second:5.0f} {100 * r.within_10pct_mean:5.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
