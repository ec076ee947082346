"""Compare the energy model's static ResNet-50 with published measured energy per image.

Published figures (data below, each with its source): MLPerf Inference v3.0, closed division,
NVIDIA's power-measured ("MaxQ") ResNet-50 Offline results, github.com/mlcommons/
inference_results_v3.0 (commit dad59af0): throughput from ``run_1/mlperf_log_summary.txt``,
wall power from the analyser's 1 s samples in ``run_1/spl.txt`` while the load runs (read off
the samples, steady to about +/-1 %).  Energy per image = watts / (images per second).

These are the only published measured ResNet-50 energies this model was checked against, and
they are not like for like: MLPerf runs INT8 TensorRT engines on tensor cores (and on Orin
also its two DLAs) with power-tuned clocks, and meters the whole system at the wall; the model
prices FP32 work on CUDA cores (the latency model's work) on one board.  The ratio is printed
as it comes out; docs/energy.md discusses it.  Nothing here was fitted to these figures.

    python benchmarks/energy_check.py
"""

from __future__ import annotations

import sys

import pandas as pd

from dynas.predictors.latency import predict
from dynas.predictors.targets import load_target
from dynas.spaces.config import ArchConfig

_MLPERF = "MLPerf Inference v3.0 closed/NVIDIA/results/{system}/resnet50/Offline/performance/run_1"
PUBLISHED = [
    {
        "target": "orin",
        "system": "Orin_TRT_MaxQ",
        "measured": "Jetson AGX Orin devkit (2048-core GPU, 32 GB), whole kit at the wall; INT8 TensorRT 8.5.2, GPU + 2 DLAs",
        "images_per_s": 3463.11,
        "watts": 22.7,  # samples 22.4-22.9 W over the run
        "idle_watts": 6.5,
    },  # samples 6.3-6.8 W before the load starts (orin.toml's static_power_w)
    {
        "target": "a100",
        "system": "A100-PCIe-80GBx8_TRT_MaxQ",
        "measured": "server with 8 x A100 PCIe 80GB (target: 1 x A100 SXM4 40GB), whole server at the wall; INT8 TensorRT",
        "images_per_s": 256083.0,
        "watts": 2050.0,  # samples 2.04-2.07 kW over the run
        "idle_watts": None,
    },  # the server's, not the GPUs': not comparable to a board's static power
]
BATCHES = (1, 128)


def table() -> pd.DataFrame:
    rows = []
    cfg = ArchConfig.static("resnet50", 224)
    for pub in PUBLISHED:
        published_mj = pub["watts"] / pub["images_per_s"] * 1e3
        row = {"target": pub["target"], "published mJ/img": published_mj, "published W": pub["watts"]}
        for n in BATCHES:
            p = predict(cfg, pub["target"], n)
            row[f"model mJ/img b{n}"] = p.energy_mj_per_image
            row[f"model W b{n}"] = p.energy_mj / p.latency_ms
            row[f"model/published b{n}"] = p.energy_mj_per_image / published_mj
        row["model static W"] = load_target(pub["target"]).energy.static_power_w
        row["source"] = _MLPERF.format(system=pub["system"])
        rows.append(row)
    return pd.DataFrame(rows)


if __name__ == "__main__":
    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", 90)
    df = table()
    print("Static ResNet-50 at 224x224: model energy per image (FP32, CUDA cores) vs published measured (INT8):")
    print(df.drop(columns="source").to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print()
    for pub, src in zip(PUBLISHED, df["source"]):
        print(f"{pub['target']}: {src}; {pub['measured']}")
    sys.exit(0)
