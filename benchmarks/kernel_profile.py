"""Where the measured time of kernel_speed.py's configs goes, by kind of operator: docs/kernels.md.

For each config of ``benchmarks/kernel_speed.py`` (its own rate, budget gates, fast path,
channels-last), this runs the dynamic network and its static backbone under ``torch.profiler``
and sums the operators' self CPU time per pass into kinds: convolutions (oneDNN and native),
matrix products (BLAS), gathers and scatters (``index_select``, advanced indexing,
``scatter_add_``, ``index_add_``, ...), batch norm, and the rest (elementwise, pooling, top-k,
index arithmetic, allocation).  Printed side by side with the operator counts, it shows what
the skipped compute bought and what the dynamic paths pay for it.

The profiler adds a few microseconds to every operator, so the small-operator kinds are
somewhat overstated; use ``kernel_speed.py`` for speed-ups and this for where the time goes.

    python benchmarks/kernel_profile.py --threads 2 --batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_speed import CONFIGS  # noqa: E402

from dynas.kernels.model import build_model  # noqa: E402
from dynas.spaces.config import load_config  # noqa: E402
from dynas.spaces.torch_model import build_static_model  # noqa: E402

#: kind -> operator names (aten::<name>) whose self time it sums; everything else is "other"
KINDS: dict[str, tuple[str, ...]] = {
    "conv": ("mkldnn_convolution", "_slow_conv2d_forward", "thnn_conv2d", "_convolution_pointwise"),
    "matmul": ("mm", "addmm", "bmm", "baddbmm", "linear", "matmul"),
    "gather": (
        "index_select",
        "index",
        "gather",
        "take",
        "scatter_",
        "scatter_add_",
        "index_add_",
        "index_copy_",
        "index_fill_",
        "index_put_",
        "masked_select",
        "nonzero",
    ),
    "batchnorm": ("native_batch_norm", "_native_batch_norm_legit_no_training", "batch_norm"),
}


def _by_kind(prof, passes: int) -> tuple[dict[str, float], int]:
    """Self CPU ms per pass by kind, and the operators per pass that the model calls (top-level
    ATen operators, not the ones they dispatch to in turn)."""
    kind_of = {name: kind for kind, names in KINDS.items() for name in names}
    ms = dict.fromkeys([*KINDS, "other"], 0.0)
    for e in prof.key_averages():
        if e.key.startswith("aten::"):
            ms[kind_of.get(e.key[len("aten::") :], "other")] += e.self_cpu_time_total / 1e3 / passes
    top = sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))
    return ms, round(top / passes)


def _profile(model: torch.nn.Module, x: torch.Tensor, passes: int) -> tuple[dict[str, float], int]:
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(passes):
                model(x)
    return _by_kind(prof, passes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passes", type=int, default=5)
    args = ap.parse_args(argv)
    if args.threads < 1 or args.passes < 1:
        ap.error(f"--threads={args.threads} / --passes={args.passes} is out of range; allowed: integers >= 1")
    torch.set_num_threads(args.threads)
    kinds = " / ".join([*KINDS, "other"])
    print(f"torch {torch.__version__}, {args.threads} threads, {args.backbone} 224x224, budget gates, fast path")
    print(f"self CPU ms per pass by kind ({kinds}); operators per pass")
    print("| config | batch | static | dynamic | operators static / dynamic |")
    print("|---|---:|---|---|---:|")
    cl = torch.channels_last
    for name, (_, rate, build) in CONFIGS.items():
        cfg = load_config({"backbone": args.backbone, "input_size": 224, "stages": build(rate)})
        torch.manual_seed(0)
        dynamic = build_model(cfg).to(memory_format=cl).eval()
        dynamic.set_gate_mode("budget")
        static = build_static_model(cfg.spec).to(memory_format=cl).eval()
        for n in args.batch_sizes:
            x = torch.randn(n, 3, 224, 224).contiguous(memory_format=cl)
            (s_ms, s_ops), (d_ms, d_ops) = _profile(static, x, args.passes), _profile(dynamic, x, args.passes)
            fmt = lambda ms: " / ".join(f"{v:.1f}" for v in ms.values())  # noqa: E731
            print(f"| {name} | {n} | {fmt(s_ms)} | {fmt(d_ms)} | {s_ops} / {d_ops} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
