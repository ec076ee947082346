"""Compare the latency model with the LAUDNet reference simulator's published figures.

Reference figures: LAUDNet (Han et al., TPAMI 2024, arXiv 2308.15949), computed by its public
DyNetSimulator (LeapLabTHU/LAUDNet): ms per image for the four residual stages of static networks on five GPUs, and
whole-network dynamic/static latency ratios on V100 at batch 128.

    python benchmarks/fidelity.py
"""

from __future__ import annotations

import sys

from dynas.predictors.fidelity import compare_reference

if __name__ == "__main__":
    static, ratios, summary = compare_reference()
    print("Static networks, ms per image, four residual stages (reference vs dynas):")
    print(static.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print()
    print("Dynamic / static latency ratios (reference vs dynas):")
    print(ratios.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print()
    for k, v in summary.items():
        print(f"{k}: {v:.3f}")
    sys.exit(0)
