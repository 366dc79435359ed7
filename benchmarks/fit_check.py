"""Fit versus generalisation of the objective experiment (docs/benchmarks.md).

    python benchmarks/fit_check.py        # benchmarks/results/fit_check/*.json, then report.py

Prunes SmolLM2-135M at one amount and seed with SparseGPT, ROSE (default) and the two
``objective="dense"`` variants, and records each model's perplexity on its own calibration windows
next to the held-out perplexity: a method that fits the calibration data and fails to generalise
shows a low first number and a high second one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import EXPERIMENTS, VARIANTS
from smollm2 import ROOT

OUT = ROOT / "benchmarks" / "results" / "fit_check"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", default="0.7")
    parser.add_argument("--seed", default="0")
    parser.add_argument("--threads", default="2")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    variants = {"sparsegpt": VARIANTS["sparsegpt"], "rose-always": VARIANTS["rose-always"], **EXPERIMENTS}
    script = Path(__file__).with_name("quality.py")
    for label, argv in variants.items():
        out = OUT / f"{label}_{args.sparsity}_seed{args.seed}.json"
        if out.is_file():
            continue
        common = ["--sparsity", args.sparsity, "--seed", args.seed, "--threads", args.threads, "--calib-ppl"]
        subprocess.run([sys.executable, str(script), "run", *argv, *common, "--out", str(out)], check=True)
        print(out, flush=True)


if __name__ == "__main__":
    main()
