"""Per-layer view: what ROSE's reordering does to each layer's error, on SmolLM2-135M.

Runs SparseGPT through rose_hf's pipeline (so every layer sees the inputs of the already-pruned
layers before it) and, for each module, prunes the *same* ``(W, H)`` again in other orders:

- ``sparsegpt``: left to right (what is kept);
- ``rose``: ROSE's order with the paper's score, forced (``reorder="always"``).

For each it records the relative layer error and ROSE's block-loss relative range; for layers whose
gate fires (and for block 0) it records the error after every block, as in the paper's motivation
figure. Output: benchmarks/results/layer_view_<sparsity>.json and docs/img/layer_view_<sparsity>.png.

    python benchmarks/layer_view.py --sparsity 0.7
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import tokens
from smollm2 import ROOT, prepare

from rose_hf import RoseConfig, RosePruner
from rose_hf.data import sample_windows
from rose_hf.ordering import rose_decision
from rose_hf.sparsegpt import reconstruction_error, sparsegpt_prune


def analyse(name: str, W: torch.Tensor, H: torch.Tensor, args: argparse.Namespace, records: list[dict]) -> None:
    n, m = (2, 4) if args.pattern == "2:4" else (0, 0)
    sparsity = 0.5 if m else args.sparsity
    record: dict = {"name": name, "shape": list(W.shape)}
    trace = name.split(".")[2] == "0"  # block 0 always
    runs = {"sparsegpt": None}
    for label, score in (("rose", "paper"),):
        decision = rose_decision(W, H, sparsity, args.blocksize, n=n, m=m, mode="always", score=score)
        record[f"{label}_range"] = decision.relative_range
        runs[label] = decision.order
        trace = trace or (label == "rose" and decision.relative_range > 0.5)
    record["gate"] = record["rose_range"] > 0.5
    for label, order in runs.items():
        result = sparsegpt_prune(
            W,
            H,
            sparsity,
            n=n,
            m=m,
            blocksize=args.blocksize,
            perm=None if order is None else order.perm,
            blocks=None if order is None else order.blocks,
            track_error=trace,
        )
        absolute, relative = reconstruction_error(W, result.weight, H)
        record[f"{label}_error"] = relative
        if trace:
            dense = absolute / relative if relative > 0 else 1.0
            record[f"{label}_trace"] = [e / dense for e in result.block_errors]
    records.append(record)


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traced = [r for r in records if "sparsegpt_trace" in r]
    traced = sorted(traced, key=lambda r: -r["rose_range"])[:4]
    fig, axes = plt.subplots(1, len(traced) + 1, figsize=(4 * (len(traced) + 1), 3.6))
    for ax, record in zip(axes, traced):
        for label, style in (("sparsegpt", "-o"), ("rose", "-s")):
            ax.plot(range(1, len(record[f"{label}_trace"]) + 1), record[f"{label}_trace"], style, label=label, ms=3)
        ax.set_title(f"{record['name'].removeprefix('model.layers.')}\nrange {record['rose_range']:.2f}", fontsize=8)
        ax.set_xlabel("blocks pruned")
        ax.set_ylabel("relative layer error")
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    ranges = [r["rose_range"] for r in records]
    ratio = [r["rose_error"] / r["sparsegpt_error"] for r in records]
    ax.scatter(ranges, ratio, s=8)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axvline(0.5, color="red", lw=0.8, ls="--")
    ax.set_xlabel("block-loss relative range")
    ax.set_ylabel("ROSE error / SparseGPT error")
    ax.set_title("every layer (gate at 0.5)", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--pattern", default="unstructured", choices=["unstructured", "2:4"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--blocksize", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(prepare(), dtype=torch.float32)
    calib = sample_windows(tokens("wikitext2-valid"), args.nsamples, args.seqlen, seed=args.seed)
    records: list[dict] = []
    sparsity = None if args.pattern == "2:4" else args.sparsity
    config = RoseConfig(sparsity=sparsity, pattern=args.pattern, method="sparsegpt", blocksize=args.blocksize)
    start = time.perf_counter()
    RosePruner(model, config, observer=lambda name, W, H: analyse(name, W, H, args, records)).prune(calib)
    tag = "2of4" if args.pattern == "2:4" else f"{args.sparsity:.2f}"
    summary = {
        "setup": vars(args),
        "seconds": time.perf_counter() - start,
        "gated": sum(r["gate"] for r in records),
        "modules": len(records),
        "records": records,
    }
    out = ROOT / "benchmarks" / "results" / f"layer_view_{tag}.json"
    out.write_text(json.dumps(summary, indent=1))
    title = f"SmolLM2-135M, {args.pattern} {tag}, seed {args.seed}"
    plot(records, ROOT / "docs" / "img" / f"layer_view_{tag}.png", title)
    print(out)


if __name__ == "__main__":
    main()
