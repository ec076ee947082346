"""Pick one trial of a dynas study and export it as a training config.

The exported JSON is an architecture config (``backbone``, ``input_size``, ``stages`` exactly as
:meth:`dynas.spaces.config.ArchConfig.to_dict` writes them, so
:func:`dynas.spaces.config.load_config` reads the file back) plus keys that ``load_config``
ignores:

- ``dynas_version``, ``study`` (name), ``trial`` (number), ``batch_size``, ``notes``;
- ``target``: ``{"name", "path", "spec"}`` of the hardware target searched for;
- ``proxy``: ``{"name", "top1", "static_top1"}``;
- ``predictions``: ``objective`` (the study's first objective, ``latency_ms`` or ``energy_mj``,
  a key of ``predictions``) and the prediction the search stored for the trial (latencies and energies for
  the whole batch and per image, static latency and energy, speed-up, FLOPs, per-stage
  breakdown), whichever the objective; energies are None on a target without energy prices;
- ``realised`` (training proxies only, when the trained gates missed the configured rates):
  ``{"config", "stages", "latency_ms", "energy_mj", "rates"}``: the config at the realised rates
  and its predictions, one of which is the trial's objective; ``predictions`` stay those of
  the configured rates, which training targets;
- ``budgets`` (studies searched with budgets only): ``{"budgets_ms" (or "budgets_mj"),
  "budget_ratios", "top1", "exits", "top1_own"}``: the budgets the trial was scored at, its
  top-1 at each and the stage of the exit that answered (None: none fits).  The architecture's ``exits`` and
  ``exit_head`` are in the config keys; confidence thresholds are fitted afterwards on the
  trained model by ``dynas exits`` (``docs/early-exits.md``);
- ``training``: the LAUDNet fine-tuning recipe as data, plus per-stage FLOPs targets;
- ``laudnet_args``: the closest LAUDNet ``train/main.py`` arguments and a ``lost`` list naming
  what those arguments cannot express.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import warnings
from typing import Any, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

import dynas
from dynas.checks import check_positive
from dynas.errors import StudyError
from dynas.results.pareto import (
    atomic_write_text,
    check_study,
    complete_trials,
    is_feasible,
    objective_column,
    study_attr,
    trial_latency_ms,
)
from dynas.search.budgets import study_budgets
from dynas.spaces.backbones import get_backbone
from dynas.spaces.config import ArchConfig, StageConfig

__all__ = ["select_trial", "export_trial", "training_recipe", "laudnet_args", "LAUDNET_ARCHS"]

#: dynas backbone -> LAUDNet ``--arch`` (their ImageNet code builds only these four)
LAUDNET_ARCHS: dict[str, str] = {
    "resnet50": "uni_resnet50",
    "resnet101": "uni_resnet101",
    "regnety_400mf": "lad_regnet_y_400mf",
    "regnety_800mf": "lad_regnet_y_800mf",
}
#: LAUDNet's ``--dyn_mode`` values per model family (their RegNet blocks have no layer mode)
_LAUDNET_MODES = {"resnet": ("spatial", "channel", "layer", "both"), "regnety": ("spatial", "channel", "both")}


# ----------------------------------------------------------------------------- selection


def _ranges(numbers: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    parts: list[str] = []
    nums = sorted(numbers)
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        parts.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ", ".join(parts)


def _by_number(study: optuna.Study, number: Any) -> FrozenTrial:
    complete = complete_trials(study)
    valid = _ranges([t.number for t in complete]) or "none (the study has no complete trial)"
    if isinstance(number, bool) or not isinstance(number, int):
        raise StudyError(f"trial={number!r} is not an integer; allowed: a complete trial number ({valid})")
    for t in complete:
        if t.number == number:
            if not is_feasible(t):
                warnings.warn(f"trial {number} violates the study's constraints {t.constraints}", stacklevel=3)
            return t
    state = next((t.state.name for t in study.get_trials(deepcopy=False) if t.number == number), None)
    why = f"is {state}" if state else "does not exist"
    raise StudyError(f"trial={number} {why} in study {study.study_name!r}; allowed: a complete trial number ({valid})")


def _fastest(trials: Sequence[FrozenTrial]) -> FrozenTrial:
    # lowest cost (the first objective: latency or energy); ties: higher top-1, then older trial
    return min(trials, key=lambda t: (t.values[0], -t.values[1], t.number))


def _most_accurate(trials: Sequence[FrozenTrial]) -> FrozenTrial:
    # highest top-1; ties: lower cost, then older trial
    return min(trials, key=lambda t: (-t.values[1], t.values[0], t.number))


def _positive(name: str, value: Any) -> float:
    return float(check_positive(name, value, problem="is invalid", allowed="a positive number", error=StudyError))


def select_trial(
    study: optuna.Study,
    trial: int | None = None,
    max_latency_ms: float | None = None,
    min_top1: float | None = None,
    max_latency_ms_per_image: float | None = None,
) -> FrozenTrial:
    """Pick one trial of a dynas study.

    Rules (only feasible COMPLETE trials are candidates, except an explicit ``trial`` number):

    - ``trial=N``: that trial; it must exist and be COMPLETE.
    - ``max_latency_ms=X``: the most accurate trial whose predicted latency for the **whole
      batch** (``study.user_attrs["batch_size"]`` images, the first objective) is <= X ms.
      ``max_latency_ms_per_image=X`` is the same bound per image (give one of the two).
    - ``min_top1=Y``: the fastest trial whose proxy top-1 is >= Y percent.
    - a latency bound and ``min_top1`` together: the most accurate trial meeting both.
    - no criterion: the fastest Pareto trial whose top-1 >= the static network's
      (``static_top1``; in a study with latency budgets ``static_budget_top1``, the static
      network's mean over the budgets); if none reaches it, the most accurate Pareto trial.

    "Fastest" is the lowest first objective: the lowest energy in an energy study (whose
    latency bounds still bound latency).  Ties go to the cheaper (or more accurate) trial, then
    to the older one.  Raises
    :class:`StudyError` when nothing qualifies, naming the best value the study achieves.
    """
    check_study(study)
    criteria = [
        n
        for n, v in (
            ("max_latency_ms", max_latency_ms),
            ("min_top1", min_top1),
            ("max_latency_ms_per_image", max_latency_ms_per_image),
        )
        if v is not None
    ]
    if trial is not None:
        if criteria:
            raise StudyError(
                f"trial={trial!r} cannot be combined with {criteria[0]}; allowed: a trial number or criteria, not both"
            )
        return _by_number(study, trial)
    if max_latency_ms is not None and max_latency_ms_per_image is not None:
        raise StudyError("max_latency_ms and max_latency_ms_per_image are both given; allowed: one latency bound")

    feasible = [t for t in complete_trials(study) if is_feasible(t)]
    if not feasible:
        raise StudyError(
            f"study {study.study_name!r} has no feasible complete trial; allowed: a study with at least one"
        )

    if not criteria:
        front = study.best_trials
        static_top1 = float(
            study_attr(study, "static_budget_top1" if study_budgets(study.user_attrs) else "static_top1")
        )
        good = [t for t in front if t.values[1] >= static_top1]
        return _fastest(good) if good else _most_accurate(front)

    candidates = feasible
    first = objective_column(study)
    latency = {t.number: trial_latency_ms(t, first) for t in feasible}
    fastest = min(feasible, key=lambda t: (latency[t.number], -t.values[1], t.number))
    if max_latency_ms is not None:
        bound = _positive("max_latency_ms", max_latency_ms)
        candidates = [t for t in candidates if latency[t.number] <= bound]
        if not candidates:
            raise StudyError(
                f"max_latency_ms={max_latency_ms!r} (whole batch) is met by no feasible trial; "
                f"allowed: >= {latency[fastest.number]:.4g} ms, the fastest (trial {fastest.number})"
            )
    if max_latency_ms_per_image is not None:
        bound = _positive("max_latency_ms_per_image", max_latency_ms_per_image)
        batch = float(study_attr(study, "batch_size"))
        candidates = [t for t in candidates if latency[t.number] / batch <= bound]
        if not candidates:
            raise StudyError(
                f"max_latency_ms_per_image={max_latency_ms_per_image!r} is met by no feasible trial; "
                f"allowed: >= {latency[fastest.number] / batch:.4g} ms per image, the fastest (trial {fastest.number})"
            )
    if min_top1 is None:
        return _most_accurate(candidates)

    if isinstance(min_top1, bool) or not isinstance(min_top1, (int, float)) or not math.isfinite(min_top1):
        raise StudyError(f"min_top1={min_top1!r} is invalid; allowed: a number (percent)")
    reaching = [t for t in candidates if t.values[1] >= min_top1]
    if not reaching:
        best = _most_accurate(candidates)
        within = " within the latency bound" if len(criteria) > 1 else ""
        raise StudyError(
            f"min_top1={min_top1!r} is reached by no feasible trial{within}; "
            f"allowed: <= {best.values[1]:.4g}, the best top-1 (trial {best.number})"
        )
    return _most_accurate(reaching) if len(criteria) > 1 else _fastest(reaching)


# ----------------------------------------------------------------------------- training recipe


def _stage_targets(cfg: ArchConfig, prediction: dict[str, Any]) -> list[dict[str, Any]]:
    stages_pred = {int(s["stage"]): s for s in prediction.get("stages", [])}
    out = []
    for i, st in enumerate(cfg.stages):
        sp = stages_pred.get(i)
        if sp is not None and sp.get("dense_gflops"):
            ratio = float(sp["expected_gflops"]) / float(sp["dense_gflops"])
            dense, expected = float(sp["dense_gflops"]), float(sp["expected_gflops"])
        else:
            ratio = dense = expected = None
        out.append(
            {
                "stage": i,
                "choice": st.short(),
                **st.to_dict(),
                "spatial_rate": st.spatial_rate,
                "channel_density": st.channel_density,
                "layer_rate": st.layer_rate,
                "dense_gflops": dense,
                "expected_gflops": expected,
                "target_flops_ratio": ratio,
            }
        )
    return out


def training_recipe(cfg: ArchConfig, prediction: dict[str, Any]) -> dict[str, Any]:
    """The LAUDNet fine-tuning recipe (Han et al., TPAMI 2024) as data, for ``cfg``.

    ``target_flops_ratio`` is the whole network's expected / dense FLOPs; each entry of
    ``stages`` gives the stage's own FLOPs target and the configured rates, for a trainer with a
    per-block sparsity target.
    """
    flops = prediction.get("flops") or {}
    dense = flops.get("dense_gflops", prediction.get("dense_gflops"))
    expected = flops.get("expected_gflops", prediction.get("expected_gflops"))
    ratio = flops.get("ratio", expected / dense if dense else None)
    h, w = cfg.input_size
    crop = h if h == w else [h, w]
    return {
        "source": "LAUDNet fine-tuning recipe (Han et al., TPAMI 2024)",
        "init": f"static pretrained {cfg.backbone} weights",
        "epochs": 100,
        "optimizer": {"name": "SGD", "nesterov": True, "momentum": 0.9, "weight_decay": 5e-5},
        "lr_schedule": "cosine",
        "batch_size": 1024,
        "lr": 0.08,
        "lr_alternative": {"batch_size": 512, "lr": 0.04},
        "augmentation": [f"RandomResizedCrop({crop})", "RandomHorizontalFlip"],
        "gumbel_temperature": {"start": 5.0, "end": 0.1, "schedule": "exponential", "per": "iteration"},
        "loss": {
            "cross_entropy": 1.0,
            "sparsity": 10.0,
            "distillation": {"weight": 0.5, "temperature": 4.0, "teacher": f"static pretrained {cfg.backbone}"},
        },
        "sparsity": {
            "per_block": "squared hinge keeping each block's FLOPs ratio inside [lower, upper] bounds",
            "bounds_start": "the block's target FLOPs ratio",
            "bounds_end": [0.0, 1.0],
            "relax_over_fraction": 1 / 3,
            "relax_schedule": "cosine-squared",
            "global": "(network FLOPs ratio - target_flops_ratio) ** 2",
            "flops_count": "stem and maskers included",
        },
        "maskers": {
            "spatial": "adaptive average pool to the mask grid -> 1x1 conv -> 2 logits -> Gumbel-softmax (hard) in training, argmax at inference",
            "channel": "global average pool -> MLP (reduction 16, hidden >= 16) -> 2 logits per channel group",
            "layer": "one decision per sample per block",
        },
        "dense_gflops": dense,
        "expected_gflops": expected,
        "target_flops_ratio": ratio,
        "stages": _stage_targets(cfg, prediction),
    }


# ----------------------------------------------------------------------------- LAUDNet arguments


def _dash(values: Sequence[Any]) -> str:
    return "-".join(str(v) for v in values)


def _laudnet_stage(st: StageConfig, whole: int, has_layer: bool) -> tuple[str, int, int, str]:
    """LAUDNet's ``dyn_mode``, mask spatial granularity and channel granularity closest to stage
    choice ``st`` (``whole``: the stage's map side; ``has_layer``: the family has a layer mode),
    and what the mapping loses ("" when it is exact)."""
    p = st.paradigm
    note = ""
    if p == "spatial":
        mode, sg, cg = "spatial", st.spatial_granularity, 1
    elif p == "channel":
        mode, sg, cg = "channel", 1, st.channel_granularity
    elif p == "spatial+channel":
        mode, sg, cg = "both", st.spatial_granularity, st.channel_granularity
    elif p == "layer":
        if has_layer:
            mode, sg, cg = "layer", whole, 1
        else:
            mode, sg, cg = "spatial", whole, 1
            note = "layer skipping emulated by a spatial mask at whole-map granularity (one decision per sample); the downsample conv stays"
    elif p == "layer+channel":
        mode, sg, cg = "both", whole, st.channel_granularity
        note = (
            "layer+channel has no LAUDNet equivalent; approximated by 'both' with a whole-map spatial mask "
            "(one gate per sample) plus channel groups, which LAUDNet neither tests nor counts as layer skipping"
        )
    else:  # static
        mode, sg, cg = ("layer" if has_layer else "spatial"), whole, 1
        note = (
            f"static stage has no LAUDNet equivalent (every stage gets a masker); approximated by "
            f"{mode!r} at whole-map granularity, which the global FLOPs target may sparsify; "
            "keep it static by forcing its gates on"
        )
    return mode, sg, cg, note


def laudnet_args(cfg: ArchConfig, target_flops_ratio: float | None) -> dict[str, Any]:
    """The closest LAUDNet ``train/main.py`` arguments for ``cfg`` and what they lose.

    Per stage: spatial -> ``spatial`` (granularity S), channel -> ``channel`` (G channels per
    group), spatial+channel -> ``both``, layer -> ``layer`` with the whole stage map as spatial
    granularity (RegNet: ``spatial`` at whole-map granularity, i.e. one decision per sample).
    A static stage and layer+channel have no LAUDNet equivalent; the closest mode is used and
    the ``lost`` list says so.  ``--target_rate`` is the one global FLOPs ratio LAUDNet trains to.
    """
    arch = LAUDNET_ARCHS.get(cfg.backbone)
    lost: list[str] = []
    if arch is None:
        return {
            "arch": None,
            "reason": f"LAUDNet's ImageNet code builds only {', '.join(sorted(LAUDNET_ARCHS))}; {cfg.backbone} has no --arch",
            "argv": None,
            "command": None,
            "exact": False,
            "lost": ["the whole config: no LAUDNet model for this backbone"],
        }
    spec = get_backbone(cfg.backbone, cfg.input_size)
    family = "resnet" if cfg.backbone.startswith("resnet") else "regnety"
    has_layer = "layer" in _LAUDNET_MODES[family]
    modes, spatial_g, channel_g, per_stage = [], [], [], []
    for i, st in enumerate(cfg.stages):
        h, w = spec.stage_out_hw(i)
        whole = h  # LAUDNet sizes masks from one int per stage (square maps)
        if h != w:
            lost.append(f"stage {i}: map {h}x{w} is not square; LAUDNet's mask sizes assume square maps")
        mode, sg, cg, note = _laudnet_stage(st, whole, has_layer)
        if note:
            lost.append(f"stage {i} ({st.short()}): {note}")
        modes.append(mode)
        spatial_g.append(sg)
        channel_g.append(cg)
        per_stage.append(
            {
                "stage": i,
                "dynas": st.short(),
                "dyn_mode": mode,
                "mask_spatial_granularity": sg,
                "channel_dyn_granularity": cg,
                "exact": not note,
            }
        )
    lost.insert(
        0, "per-stage rates collapse to one global FLOPs target (--target_rate); LAUDNet learns per-block densities"
    )
    if any(st.paradigm in ("spatial+channel", "layer+channel") for st in cfg.stages):
        lost.append("channel_rate of combined stages is not an argument; only the global FLOPs target constrains it")
    if spec.input_hw != (224, 224):
        lost.append(
            f"input_size {spec.input_hw[0]}x{spec.input_hw[1]}: LAUDNet's models and data pipeline assume 224x224"
        )
    lost.append("the hardware target and its latency model play no part in LAUDNet training")
    n = len(cfg.stages)
    args: dict[str, Any] = {
        "--arch": arch,
        "--config": "configs/finetune_100eps_1024bs_lr0x08.py",
        "--dyn_mode": _dash(modes),
        "--mask_spatial_granularity": _dash(spatial_g),
        "--channel_dyn_granularity": _dash(channel_g),
        "--mask_channel_group": _dash([1] * n),
        "--channel_masker": _dash(["MLP"] * n),
        "--channel_masker_layers": _dash([2] * n),
        "--channel_masker_reduction": _dash([16] * n),
        "--target_rate": None if target_flops_ratio is None else round(float(target_flops_ratio), 4),
        "--lambda_act": 10.0,
        "--T_kd": 4.0,
        "--alpha_kd": 0.5,
        "--temp_scheduler": "exp",
        "--t0": 5.0,
        "--t_last": 0.1,
        "--target_begin_epoch": 0,
    }
    if target_flops_ratio is None:
        lost.append("--target_rate unknown: the stored prediction has no FLOPs")
    argv = [tok for k, v in args.items() if v is not None for tok in (k, str(v))]
    return {
        "arch": arch,
        "dyn_mode": args["--dyn_mode"],
        "mask_spatial_granularity": args["--mask_spatial_granularity"],
        "channel_dyn_granularity": args["--channel_dyn_granularity"],
        "target_rate": args["--target_rate"],
        "args": args,
        "argv": argv,
        "command": "python -u train/main.py " + " ".join(shlex.quote(a) for a in argv),
        "stages": per_stage,
        "exact": all(s["exact"] for s in per_stage),
        "lost": lost,
    }


# ----------------------------------------------------------------------------- export


def _budgets(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """The ``budgets`` key of a trial of a study searched with budgets (else nothing)."""
    sa, ua = study.user_attrs, trial.user_attrs
    given = study_budgets(sa)
    if given is None:
        return {}
    return {
        "budgets": {
            f"budgets_{given[1]}": list(given[0]),
            "budget_ratios": sa.get("budget_ratios"),
            "top1": ua.get("budget_top1"),
            "exits": ua.get("budget_exit"),
            "top1_own": ua.get("top1_own"),
        }
    }


def export_trial(study: optuna.Study, trial: FrozenTrial | int, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``trial`` of ``study`` as a JSON training config at ``path`` (atomically); return it.

    ``trial`` is a :class:`~optuna.trial.FrozenTrial` or a trial number.  See the module
    docstring for the keys; ``load_config(path)`` gives back the trial's architecture.
    """
    check_study(study)
    if not isinstance(trial, FrozenTrial):
        trial = _by_number(study, trial)
    if trial.state != TrialState.COMPLETE:
        raise StudyError(f"trial={trial.number} is {trial.state.name}; allowed: a COMPLETE trial")
    ua = trial.user_attrs
    if not isinstance(ua.get("config"), dict):
        raise StudyError(f"trial {trial.number} has no user attr 'config'; allowed: a trial written by dynas search")
    cfg = ArchConfig.from_dict(ua["config"])
    prediction = dict(ua.get("prediction") or {})
    prediction.pop("config", None)
    sa = study.user_attrs
    batch_size = sa.get("batch_size", prediction.get("batch_size"))
    first = objective_column(study)
    cost, top1 = (float(v) for v in trial.values)
    latency_ms = trial_latency_ms(trial, first)
    energy_mj = cost if first == "energy_mj" else ua.get("energy_mj", prediction.get("energy_mj"))
    recipe = training_recipe(cfg, prediction)
    notes = [
        f"predictions.latency_ms is one forward pass of the whole batch ({batch_size} images) on target "
        f"{sa.get('target')!r}; latency_ms_per_image divides it by the batch size; energy_mj likewise "
        "(None: the target predicts no energy)",
        f"the search minimised {first} beside top-1",
        "rates are activation rates: positions (spatial), channel groups (channel), samples (layer); "
        "channel_rate is the channel-group rate of combined stages",
        f"top-1 is the {sa.get('proxy')!r} accuracy proxy's estimate, not a measured accuracy"
        if sa.get("proxy") != "finetune"
        else "top-1 is held-out accuracy after the finetune proxy's short fine-tune on the search's data, not after full training",
    ]
    given = study_budgets(sa)
    if given:
        notes.append(
            f"proxy.top1 is the mean over budgets.budgets_{given[1]} of the top-1 of the deepest exit that fits each budget "
            "(chance where none fits); the confidence thresholds are fitted on the trained model by dynas exits"
        )
    if not is_feasible(trial):
        notes.append(f"this trial violates the study's constraints {trial.constraints}")
    if sa.get("dynas_version") not in (None, dynas.__version__):
        notes.append(f"searched with dynas {sa['dynas_version']}, exported with dynas {dynas.__version__}")
    data: dict[str, Any] = {
        **cfg.to_dict(),
        "dynas_version": dynas.__version__,
        "study": study.study_name,
        "trial": trial.number,
        "target": {"name": sa.get("target"), "path": sa.get("target_path"), "spec": sa.get("target_spec")},
        "batch_size": batch_size,
        "proxy": {"name": sa.get("proxy"), "top1": top1, "static_top1": sa.get("static_top1")},
        "predictions": {
            **prediction,
            "objective": first,
            "latency_ms": prediction.get("latency_ms", latency_ms),
            "latency_ms_per_image": prediction.get("latency_ms_per_image", ua.get("latency_ms_per_image")),
            "static_latency_ms": prediction.get("static_latency_ms", sa.get("static_latency_ms")),
            "energy_mj": prediction.get("energy_mj", energy_mj),
            "energy_mj_per_image": prediction.get("energy_mj_per_image", ua.get("energy_mj_per_image")),
            "static_energy_mj": prediction.get("static_energy_mj", sa.get("static_energy_mj")),
            "speedup": prediction.get("speedup", ua.get("speedup")),
            "flops": prediction.get("flops", {"ratio": ua.get("flops_ratio")}),
        },
        **(
            {
                "realised": {
                    "config": ua["realised_config"],
                    "stages": ua.get("realised_short"),
                    "latency_ms": latency_ms,
                    "energy_mj": energy_mj,
                    "rates": ua.get("realised_rates"),
                }
            }
            if isinstance(ua.get("realised_config"), dict)
            else {}
        ),
        **_budgets(study, trial),
        "training": recipe,
        "laudnet_args": laudnet_args(cfg, recipe["target_flops_ratio"]),
        "notes": notes,
    }
    try:
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise StudyError(
            f"trial {trial.number} has a NaN or infinite stored value; allowed: finite predictions"
        ) from None
    atomic_write_text(path, text)
    return data
