"""How much of a target's held-out error is the host's, and how much the model's?

Takes two ``dynas validate`` tables of the same configs (same ``--seed`` and ``--count``),
measured at different times in pairs (``--host-check pairs``), and the target they were
scored against.  Each network's time is put in units of the host at calibration (measured x
the target's static time / the static time measured alongside it), then per batch size:

* ``noise %``: the standard deviation of the log ratio of the two measurements of the same
  network over sqrt(2): the noise of one measurement;
* ``error std %``: the standard deviation of log(predicted / measured) in each table;
* ``corr``: the correlation of those errors between the two tables (near 1: each config
  keeps its error, so it is the model's; near 0: it is the host's);
* ``within 10 %``: the share of networks within +/-10 % in each table, and against the
  geometric mean of both measurements.

    python benchmarks/retest.py --target benchmarks/data/cpu-2core-dec01-pairs/cpu-2core-dec01-pairs.toml \\
        benchmarks/data/cpu-2core-dec01-pairs/validation-seed32.csv \\
        benchmarks/data/cpu-2core-dec01-pairs/validation-seed32-retest.csv
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

from dynas.errors import DynasError
from dynas.predictors.calibration import calibrated_static_ms, compare
from dynas.predictors.targets import load_target


def normalised_networks(path: str, target) -> pd.DataFrame:
    """Network rows of one validation table, indexed by (config, batch_size), with
    ``predicted_ms`` (this target) and ``quiet_ms``: the measured time in units of the host at
    calibration."""
    df = pd.read_csv(path)
    if "reference_ms" not in df or df["reference_ms"].isna().all():
        raise DynasError(f"{path}: reference_ms is empty; allowed: a table measured with --host-check pairs")
    df = compare(df[df["part"] == "network"], target)  # predicted_ms by this target
    df["quiet_ms"] = df["measured_ms"] * calibrated_static_ms(df, target) / df["reference_ms"]
    return df.set_index(["config", "batch_size"])[["backbone", "predicted_ms", "quiet_ms"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="target file the tables are scored against")
    ap.add_argument("first", help="validation CSV")
    ap.add_argument("second", help="validation CSV of the same configs, measured again")
    args = ap.parse_args(argv)
    try:
        target = load_target(args.target)
        a, b = normalised_networks(args.first, target), normalised_networks(args.second, target)
    except (DynasError, OSError) as exc:
        print(f"retest: {exc}", file=sys.stderr)
        return 2
    both = a.join(b[["quiet_ms"]].rename(columns={"quiet_ms": "quiet_ms_2"}), how="inner")  # [networks in both]
    if both.empty:
        print("retest: the two tables share no network; allowed: tables of the same --seed and --count", file=sys.stderr)
        return 2
    print(f"{len(both)} networks in both tables")
    print("batch  networks  noise %  error std % (1st, 2nd)  corr  within 10 % (1st, 2nd, mean of both)")
    for n, x in both.groupby(level="batch_size"):
        drift = np.log(x["quiet_ms_2"] / x["quiet_ms"])  # [networks]
        e1 = np.log(x["predicted_ms"] / x["quiet_ms"])
        e2 = np.log(x["predicted_ms"] / x["quiet_ms_2"])
        em = np.log(x["predicted_ms"] / np.sqrt(x["quiet_ms"] * x["quiet_ms_2"]))
        within = [100 * float((np.abs(np.expm1(e)) <= 0.1).mean()) for e in (e1, e2, em)]
        corr = float(np.corrcoef(e1, e2)[0, 1]) if len(x) > 2 else float("nan")
        print(f"{n:5d}  {len(x):8d}  {100 * drift.std() / np.sqrt(2):7.2f}  {100 * e1.std():10.2f} {100 * e2.std():6.2f}"
              f"           {corr:5.2f}  {within[0]:5.0f} {within[1]:5.0f} {within[2]:5.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
