"""Fit a measured target to calibration measurements, and score predictions against measurements.

Input: the measurement table of ``dynas calibrate`` / ``dynas validate``
(:func:`dynas.kernels.calibrate.run_plan`; one row per part -- ``stem``, ``stage0`` ...,
``head``, ``network``, and from ``dynas validate`` ``block0.0`` ... -- of every measured
network, with ``config``, ``batch_size`` and ``measured_ms``).  Kernels measure, predictors
fit: nothing here imports ``dynas.kernels``.

Fit (:func:`fit_target`): every stem, stage and head row is a sum of work terms
(:mod:`dynas.predictors.cpu`) times unknown non-negative costs.  The costs minimise the sum of
squared *relative* errors (each row divided by its measurement, so a 1 ms stage counts as much
as a 100 ms one), by non-negative least squares (``scipy.optimize.nnls``).  Whole-network and
block rows are left out of the fit; they are what :func:`compare` checks.

Paired measurements (``host_check`` = ``"pairs"``: each network's passes alternate with passes
of its static network, whose median is ``reference_ms``) are first put in units of the quiet
host (:func:`host_normalized`), so that the fit sees one machine, not a machine whose speed
moved while it was measured.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np
import pandas as pd

from dynas.errors import ConfigError
from dynas.predictors import cpu
from dynas.predictors.latency import predict, predict_blocks, stage_work
from dynas.predictors.targets import HardwareTarget, load_target, static_key
from dynas.spaces.config import load_config, stage_gate_kind, stage_runs

__all__ = [
    "REQUIRED_COLUMNS",
    "check_measurements",
    "fit_target",
    "compare",
    "summarize",
    "cost_comments",
    "calibrated_static_ms",
    "fitted_parts",
    "host_normalized",
    "paired_rows",
    "per_sample_gated",
    "round_spread",
    "quiet_networks",
    "retest_summary",
]

REQUIRED_COLUMNS: tuple[str, ...] = ("config", "batch_size", "part", "stage", "measured_ms")


def check_measurements(df: pd.DataFrame, what: str) -> None:
    """Raise :class:`ConfigError` unless ``df`` is a usable measurement table."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(
            f"{what}: column {missing[0]!r} is missing; allowed: a table with {', '.join(REQUIRED_COLUMNS)}"
        )
    if df.empty:
        raise ConfigError(f"{what}: the table has no rows; allowed: at least one measured network")
    ms = pd.to_numeric(df["measured_ms"], errors="coerce")
    bad = df[~np.isfinite(ms) | (ms <= 0)]
    if not bad.empty:
        v = bad["measured_ms"].iloc[0]
        raise ConfigError(
            f"{what}: measured_ms={float(v) if isinstance(v, (int, float, np.number)) else v!r} is out of range; "
            "allowed: a number > 0"
        )


def _loaded(config: str, cache: dict) -> Any:
    """The :class:`ArchConfig` of a table's ``config`` JSON, parsed once per ``cache``."""
    cfg = cache.get(config)
    if cfg is None:
        cfg = cache[config] = load_config(config)
    return cfg


def _part_work(config: Any, n: int, part: str, stage: int, cache: dict, column_block: int = 1) -> np.ndarray:
    """[len(TERMS)] work of one part of one network (stem, stage ``stage`` or head)."""
    cfg = _loaded(config, cache)
    spec = cfg.spec
    if part == "stem":
        return cpu.stem_work(spec.stem, spec.input_hw, n)
    if part == "head":
        return cpu.head_work(spec.head_in, spec.blocks[-1].out_hw, spec.num_classes, n, spec.head_norm)
    runs = cache.get((config, "runs"))
    if runs is None:
        runs = cache[(config, "runs")] = stage_runs(cfg)
    return stage_work(spec.name, spec.input_hw, stage, cfg.stages[stage], n, runs[stage], column_block)


def _design_matrix(df: pd.DataFrame, column_block: int = 1, cache: dict | None = None) -> np.ndarray:
    cache = {} if cache is None else cache
    return np.stack(
        [
            _part_work(r.config, int(r.batch_size), r.part, int(r.stage), cache, column_block)
            for r in df.itertuples(index=False)
        ]
    )  # [rows, terms]


def _nnls_relative(X: np.ndarray, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[terms] costs >= 0 minimising sum((X c / y - 1)^2) over ``rows`` (columns scaled for conditioning)."""
    from scipy.optimize import nnls

    A = X[rows] / y[rows, None]  # [rows, terms]
    scale = A.max(axis=0)
    scale[scale == 0] = 1.0  # a term no row exercises keeps cost 0
    coef, _ = nnls(A / scale, np.ones(int(rows.sum())), maxiter=50 * X.shape[1])
    return coef / scale


def _fit_costs(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Costs fitted to rows ``X`` [rows, terms] -> ``y`` [rows] ms, leaving out disturbed rows.

    Returns ``(X, coef, keep, median_rel_err, limit)``: ``coef`` in ms per unit, ``keep`` the
    rows used, the median |relative error| over all rows, the outlier limit."""
    coef = _nnls_relative(X, y, np.ones(len(y), dtype=bool))
    rel = X @ coef / y - 1
    # rows disturbed by other load on the machine: drop those far off a first fit, fit again
    limit = max(0.1, 4.0 * float(np.median(np.abs(rel))))
    keep = np.abs(rel) <= limit
    coef = _nnls_relative(X, y, keep)
    return X, coef, keep, float(np.median(np.abs(X @ coef / y - 1))), limit


def paired_rows(df: pd.DataFrame) -> pd.Series:
    """[rows] bool: rows measured in pairs with their static network (``host_check`` =
    ``"pairs"``) that have a usable ``reference_ms``."""
    if "host_check" not in df or "reference_ms" not in df:
        return pd.Series(False, index=df.index, dtype=bool)
    ref = pd.to_numeric(df["reference_ms"], errors="coerce")
    return (df["host_check"].astype(str) == "pairs") & np.isfinite(ref) & (ref > 0)


def host_normalized(measurements: pd.DataFrame, cache: dict | None = None) -> pd.DataFrame:
    """``measurements`` with every paired row's ``measured_ms`` put in units of the quiet host.

    Rule: the quiet time of a static network (backbone, input size, batch size) is the fastest
    of its ``reference_ms`` over the table; a paired row's time is multiplied by that over its
    own ``reference_ms``.  A network measured while the host ran 20 % slow had its static
    network paired with it 20 % slow too, and comes out as if the host had been quiet.  Rows
    without a pair are returned unchanged; the raw time is kept as ``raw_measured_ms``."""
    paired = paired_rows(measurements)
    if not paired.any():
        return measurements
    df = measurements.copy()
    ref = pd.to_numeric(df["reference_ms"], errors="coerce")
    cache = {} if cache is None else cache
    keys = pd.Series(
        [_static_key_of(_loaded(c, cache), n) for c, n in zip(df["config"], df["batch_size"])], index=df.index
    )  # [rows] key of the row's static network
    quiet = ref.where(paired).groupby(keys).transform("min")  # [rows] fastest reference of the row's static network
    df["raw_measured_ms"] = df["measured_ms"]
    df.loc[paired, "measured_ms"] = df.loc[paired, "measured_ms"].astype(float) * quiet[paired] / ref[paired]
    return df


#: folds of the cross-validation that picks the column block, and the fewest networks it needs
CV_FOLDS, CV_MIN_NETWORKS = 5, 20


def _cv_folds(parts: pd.DataFrame, measurements: pd.DataFrame, cache: dict) -> tuple[np.ndarray, pd.Series] | None:
    """The folds of :func:`_network_cv_mape`: ``row_fold`` [rows of ``parts``] (-1 for a
    network without all its part rows) and the measured ms of each network by ``network_id``.

    The networks whose stem, stages, head and network rows are all in ``measurements`` are split
    into :data:`CV_FOLDS` folds by a fixed shuffle, so a refit gives the same target.  None when
    fewer than :data:`CV_MIN_NETWORKS` such networks exist."""
    if "network_id" not in measurements:
        return None
    nets = measurements[measurements["part"] == "network"]
    ids = parts["network_id"].to_numpy()  # [rows]
    n_parts = pd.Series(ids).value_counts()
    expected = {int(i): 2 + _loaded(c, cache).spec.num_stages for i, c in zip(nets["network_id"], nets["config"])}
    whole = sorted(i for i, k in expected.items() if n_parts.get(i, 0) == k)  # networks with every part row
    if len(whole) < CV_MIN_NETWORKS:
        return None
    order = np.random.default_rng(0).permutation(len(whole))
    fold = {whole[j]: k % CV_FOLDS for k, j in enumerate(order)}  # network id -> fold
    row_fold = np.array([fold.get(int(i), -1) for i in ids])  # [rows]
    return row_fold, nets.drop_duplicates("network_id").set_index("network_id")["measured_ms"].astype(float)


def _network_cv_mape(X: np.ndarray, y: np.ndarray, ids: np.ndarray, folds: tuple[np.ndarray, pd.Series]) -> float:
    """Mean |relative error| of whole networks predicted by costs fitted without them.

    ``X`` [rows, terms] / ``y`` [rows] are part rows, ``ids`` [rows] their ``network_id``,
    ``folds`` from :func:`_cv_folds`; each fold's network times are predicted as the sum of
    their parts' work times costs fitted on the other folds."""
    row_fold, measured = folds
    errs = []
    for f in range(CV_FOLDS):
        _, coef, _, _, _ = _fit_costs(X[row_fold != f], y[row_fold != f])
        test = row_fold == f
        pred = pd.Series(X[test] @ coef).groupby(ids[test]).sum()  # [networks of fold f] ms
        errs.append((pred / measured.reindex(pred.index) - 1).abs().to_numpy())
    return float(np.mean(np.concatenate(errs)))


def fit_target(
    measurements: pd.DataFrame,
    name: str,
    environment: Mapping[str, Any] | None = None,
    default_batch_size: int = 1,
    description: str = "",
) -> HardwareTarget:
    """A ``"cpu"`` kind target whose costs best fit the stem/stage/head rows of ``measurements``
    (paired ones first normalised to the quiet host, :func:`host_normalized`)."""
    check_measurements(measurements, "calibration measurements")
    n_paired = (
        int(measurements.loc[paired_rows(measurements), "network_id"].nunique())
        if "network_id" in measurements
        else int(paired_rows(measurements).sum())
    )
    cache: dict = {}
    measurements = host_normalized(measurements, cache)
    parts = measurements[fitted_parts(measurements)]
    if len(parts) < len(cpu.TERMS):
        raise ConfigError(
            f"calibration measurements: {len(parts)} part rows are too few; allowed: at least "
            f"{len(cpu.TERMS)} (measure more networks: raise --budget-s)"
        )
    y = parts["measured_ms"].to_numpy(dtype=np.float64)  # [rows]
    # The column block is not linear in the work: fit the costs for each candidate and keep the
    # one that predicts held-out whole networks best (:func:`_network_cv_mape`).  Without
    # enough network rows, the one whose fit has the smallest median relative error over all
    # part rows (the median, because each candidate's fit leaves out a different set of
    # disturbed rows).  The part medians of the candidates differ by hundredths of a percent on
    # real tables, less than the noise; the network error is what a target is used for.
    designs = {cb: _design_matrix(parts, cb, cache) for cb in cpu.COLUMN_BLOCKS}  # {cb: [rows, terms]}
    fits = {cb: _fit_costs(designs[cb], y) for cb in cpu.COLUMN_BLOCKS}
    folds = _cv_folds(parts, measurements, cache)
    cv = (
        {}
        if folds is None
        else {cb: _network_cv_mape(designs[cb], y, parts["network_id"].to_numpy(), folds) for cb in cpu.COLUMN_BLOCKS}
    )
    if cv:
        column_block = min(cv, key=lambda cb: (cv[cb], cb))
    else:
        column_block = min(fits, key=lambda cb: (fits[cb][3], cb))
    X, coef, keep, _, limit = fits[column_block]
    rel = (X @ coef / y - 1)[keep]
    env = dict(environment or {})
    unexercised = [f for f, col in zip(cpu.COST_FIELDS, X[keep].T) if not np.any(col > 0)]
    costs = cpu.CpuCosts.from_vector_ms(coef)
    # no channel part ran after another (batch 1 only): later parts cost what a first part does
    later = {f: getattr(costs, src) for f, src in cpu.LATER_PART_FIELDS.items() if f in unexercised}
    costs = costs._replace(**later)
    unexercised = [f for f in unexercised if f not in later]
    networks = int(measurements["network_id"].nunique()) if "network_id" in measurements else 0
    fit = {
        "unexercised": ",".join(unexercised),
        "rows": int(keep.sum()),
        "outlier_rows": int((~keep).sum()),
        "column_block_median_err_pct": ", ".join(f"{cb}: {fits[cb][3] * 100:.2f}" for cb in fits),
        "column_block_network_cv_mape_pct": ", ".join(f"{cb}: {v * 100:.2f}" for cb, v in cv.items()),
        "outlier_limit_pct": limit * 100,
        "networks": networks,
        "parts_mape_pct": float(np.mean(np.abs(rel)) * 100),
        "parts_within_10pct": float(np.mean(np.abs(rel) <= 0.1)),
    }
    spread = round_spread(measurements)
    if spread is not None:
        fit.update({"round_spread_median_pct": spread["median_pct"], "round_spread_p90_pct": spread["p90_pct"]})
    paired_spread = round_spread(measurements, "paired_spread")
    if paired_spread is not None:
        fit.update(
            {"paired_spread_median_pct": paired_spread["median_pct"], "paired_spread_p90_pct": paired_spread["p90_pct"]}
        )
    if n_paired:
        fit["host_normalized_networks"] = n_paired
    threads = int(env.get("threads", 1) or 1)
    static_ms = _static_ms(measurements, cache)
    return HardwareTarget(
        name=name,
        description=description or f"dynas kernels measured on {env.get('device_name', 'this device')}",
        kind="cpu",
        default_batch_size=default_batch_size,
        cpu=costs,
        threads=threads,
        column_block=column_block,
        unexercised=tuple(unexercised),
        environment={k: v for k, v in env.items() if isinstance(v, (str, int, float))},
        fit=fit,
        static_ms=static_ms,
    )


def round_spread(df: pd.DataFrame, column: str = "round_spread") -> dict[str, float] | None:
    """How far apart the rounds of the same networks came out (``round_spread`` of
    :func:`dynas.kernels.calibrate.run_rounds`; ``column="paired_spread"``: their times over
    their paired static networks'): ``count`` networks measured more than once, the
    ``median_pct`` and ``p90_pct`` of how much longer their slowest round took.  None when no
    network was measured twice."""
    if column not in df:
        return None
    spread = pd.to_numeric(df.loc[df["part"] == "network", column], errors="coerce").dropna()
    if spread.empty:
        return None
    return {
        "count": int(len(spread)),
        "median_pct": float(spread.median() * 100),
        "p90_pct": float(spread.quantile(0.9) * 100),
    }


def fitted_parts(df: pd.DataFrame) -> pd.Series:
    """[rows] bool: the stem, stage and head rows of a measurement table (what the fit uses)."""
    part = df["part"].astype(str)
    return part.isin(("stem", "head")) | part.str.startswith("stage")


def per_sample_gated(df: pd.DataFrame) -> pd.Series:
    """[rows] bool: rows of a stage (or of a block of a stage) whose gates decide per sample
    which of its blocks run (layer gates, whole-map spatial gates).  Which blocks run changes
    from pass to pass, so a single block's median time is not its expected cost; such stages
    are scored whole."""
    cache: dict[str, Any] = {}
    out = []
    for config, stage in zip(df["config"], df["stage"]):
        cfg = _loaded(config, cache)
        s = int(stage)
        out.append(s >= 0 and stage_gate_kind(cfg.spec, s, cfg.stages[s]) is not None)
    return pd.Series(out, index=df.index, dtype=bool)


def _static_key_of(cfg: Any, batch_size: Any) -> str:
    """The :func:`static_key` of ``cfg`` 's static network at ``batch_size``."""
    return static_key(cfg.backbone, cfg.input_size, int(batch_size))


def calibrated_static_ms(df: pd.DataFrame, target: HardwareTarget) -> pd.Series:
    """[rows] the time ``target`` recorded at calibration (``static_ms``) for the static network
    of each row's backbone, input size and batch size; NaN where it recorded none.  A row's
    ``reference_ms`` over it is how much slower the host ran than at calibration."""
    return pd.Series(
        [
            target.static_ms.get(static_key(b, (int(h), int(w)), int(n)), math.nan)
            for b, h, w, n in zip(df["backbone"], df["input_h"], df["input_w"], df["batch_size"])
        ],
        index=df.index,
        dtype=float,
    )


def _static_ms(measurements: pd.DataFrame, cache: dict) -> dict[str, float]:
    """Median measured latency of each wholly static network in ``measurements`` (by ``static_key``)."""
    nets = measurements[measurements["part"] == "network"]
    times: dict[str, list[float]] = {}
    for r in nets.itertuples(index=False):
        cfg = _loaded(r.config, cache)
        if all(st.paradigm == "static" for st in cfg.stages):
            times.setdefault(_static_key_of(cfg, r.batch_size), []).append(float(r.measured_ms))
    return {k: float(np.median(v)) for k, v in sorted(times.items())}


def cost_comments(costs: cpu.CpuCosts) -> dict[str, str]:
    """A human reading of each fitted cost (an effective throughput, a bandwidth, an overhead)."""
    return costs.readings()


def compare(measurements: pd.DataFrame, target: "str | HardwareTarget") -> pd.DataFrame:
    """``measurements`` with ``predicted_ms`` and ``rel_err`` (predicted / measured - 1) per row.

    Network rows are predicted by :func:`dynas.predict`; stage rows by its per-stage figures;
    block rows (``block{stage}.{index}``) by :func:`~dynas.predictors.latency.predict_blocks`;
    stem and head rows are dropped.
    """
    check_measurements(measurements, "measurements")
    tgt = load_target(target)
    df = measurements[measurements["part"].astype(str).str.startswith(("network", "stage", "block"))].copy()
    preds: dict[tuple[str, int], Any] = {}
    blocks: dict[tuple[str, int], tuple[tuple[float, ...], ...]] = {}
    out = []
    for r in df.itertuples(index=False):
        key = (r.config, int(r.batch_size))
        if key not in preds:
            preds[key] = predict(r.config, tgt, int(r.batch_size))
        p = preds[key]
        if r.part == "network":
            out.append(p.latency_ms)
        elif r.part.startswith("block"):
            if key not in blocks:
                blocks[key] = predict_blocks(p.config, tgt, int(r.batch_size))
            m = re.fullmatch(r"block(\d+)\.(\d+)", r.part)
            per_stage = blocks[key]
            if m is None or int(m[1]) >= len(per_stage) or int(m[2]) >= len(per_stage[int(m[1])]):
                raise ConfigError(
                    f"measurements: part={r.part!r} is not a block of {p.config.backbone}; allowed: "
                    f"block<stage>.<index>, stages 0-{len(per_stage) - 1}, blocks per stage "
                    f"{'/'.join(str(len(b)) for b in per_stage)}"
                )
            out.append(per_stage[int(m[1])][int(m[2])])
        else:
            out.append(p.stages[int(r.stage)].latency_ms)
    df["predicted_ms"] = out
    df["rel_err"] = df["predicted_ms"] / df["measured_ms"] - 1
    return df


def summarize(df: pd.DataFrame) -> dict[str, float]:
    """MAPE (%), share within +/-10 %, Spearman and Kendall rank correlation of one comparison."""
    from scipy.stats import kendalltau, spearmanr

    rel = df["rel_err"].to_numpy()
    n = len(rel)
    if n < 2:
        rho = tau = math.nan
    else:
        rho = float(spearmanr(df["measured_ms"], df["predicted_ms"]).statistic)
        tau = float(kendalltau(df["measured_ms"], df["predicted_ms"]).statistic)
    return {
        "count": n,
        "mape_pct": float(np.mean(np.abs(rel)) * 100),
        "within_10pct": float(np.mean(np.abs(rel) <= 0.1)),
        "spearman": rho,
        "kendall": tau,
        "max_abs_err_pct": float(np.max(np.abs(rel)) * 100),
    }


def quiet_networks(table: pd.DataFrame, target: "str | HardwareTarget", what: str = "measurements") -> pd.DataFrame:
    """The network rows of a validation table measured in pairs (``--host-check pairs``), indexed
    by (``config``, ``batch_size``), with ``backbone``, ``predicted_ms`` (by ``target``) and
    ``quiet_ms``: the measured time in units of the host at calibration (measured x the target's
    ``static_ms`` / the ``reference_ms`` measured alongside it)."""
    if "reference_ms" not in table or table["reference_ms"].isna().all():
        raise ConfigError(f"{what}: column 'reference_ms' is empty; allowed: a table measured with --host-check pairs")
    tgt = load_target(target)
    df = compare(table[table["part"] == "network"], tgt)  # [networks] with predicted_ms
    df["quiet_ms"] = df["measured_ms"] * calibrated_static_ms(df, tgt) / df["reference_ms"]
    return df.set_index(["config", "batch_size"])[["backbone", "predicted_ms", "quiet_ms"]]


def retest_summary(first: pd.DataFrame, second: pd.DataFrame, target: "str | HardwareTarget") -> pd.DataFrame:
    """How much of a target's held-out error is the host's and how much the model's: two
    validation tables of the same configs measured in pairs at different times, compared per
    batch size over the networks in both (in units of the host at calibration,
    :func:`quiet_networks`).  One row per batch size:

    * ``networks``: networks in both tables;
    * ``noise_pct``: the standard deviation of the log ratio of the two measurements of a
      network, over sqrt(2): the noise of one measurement;
    * ``error_std_pct_first`` / ``_second``: the standard deviation of log(predicted / measured);
    * ``error_corr``: the correlation of those errors between the tables (near 1: each config
      keeps its error, so it is the model's; near 0: it is the host's); NaN under 3 networks;
    * ``within_10pct_first`` / ``_second`` / ``_mean``: the share within +/-10 % in each table
      and against the geometric mean of both measurements.
    """
    tgt = load_target(target)
    a, b = quiet_networks(first, tgt, "first table"), quiet_networks(second, tgt, "second table")
    both = a.join(b[["quiet_ms"]].rename(columns={"quiet_ms": "quiet_ms_2"}), how="inner")  # [networks in both]
    if both.empty:
        raise ConfigError("second table: no network of the first table; allowed: tables of the same --seed and --count")
    rows = []
    for n, x in both.groupby(level="batch_size"):
        drift = np.log(x["quiet_ms_2"] / x["quiet_ms"])  # [networks]
        errors = {
            k: np.log(x["predicted_ms"] / q)
            for k, q in (  # [networks] each
                ("first", x["quiet_ms"]),
                ("second", x["quiet_ms_2"]),
                ("mean", np.sqrt(x["quiet_ms"] * x["quiet_ms_2"])),
            )
        }
        corr = float(np.corrcoef(errors["first"], errors["second"])[0, 1]) if len(x) > 2 else math.nan
        rows.append(
            {
                "batch_size": int(n),
                "networks": len(x),
                "noise_pct": 100 * drift.std() / math.sqrt(2),
                "error_std_pct_first": 100 * errors["first"].std(),
                "error_std_pct_second": 100 * errors["second"].std(),
                "error_corr": corr,
                **{f"within_10pct_{k}": float((np.abs(np.expm1(e)) <= 0.1).mean()) for k, e in errors.items()},
            }
        )
    return pd.DataFrame(rows)
