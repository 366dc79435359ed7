"""Probe: does the residual rotation cost the modules its loss does not count, the writers?

``rotation="residual"`` learns ``R`` on the readers of the residual stream (q/k/v, gate/up: their
columns rotate), but it also rotates the writers' rows (``o_proj``, ``down_proj``: ``Rᵀ W``), whose
importance its loss ignores. Hypothesis: mixing the writers' rows spreads their importance over
more weights, so the pattern drops more of it, and that is why the rotation raises perplexity in
domain (docs/algorithm.md). This measures, on the dense model, the share of SparseGPT's importance
that 2:4 drops (``rose_hf.rotation.dropped_share``) per module before and after the rotation, for
the writers and the readers, with the rotation learned on each objective. Nothing is pruned.

    python benchmarks/residual_writers_probe.py [--nsamples 32] [--steps 100]

Output: benchmarks/results/residual_writers_probe/smollm2.json; the run prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import prepare
from recipes import calibration_windows
from residual_order_probe import input_hessians
from smollm2 import ROOT

from rose_hf.residual import rotate_residual
from rose_hf.rotation import dropped_share, importance
from rose_hf.sparsegpt import inverse_hessian

RESULTS = ROOT / "benchmarks" / "results" / "residual_writers_probe"
MODULES = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
WRITERS = ("o_proj", "down_proj")


def input_diagonals(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per module, the diagonal of the inverse of ``2/N XᵀX`` of its input (1 % dampening)."""
    watched = {
        f"{index}.{name}": getattr(getattr(block, half), name)
        for index, block in enumerate(model.model.layers)
        for half, names in MODULES.items()
        for name in names
    }
    hessians = input_hessians(model, ids, watched)
    return {name: torch.diagonal(inverse_hessian(H, 0.01)) for name, H in hessians.items()}


def shares(model: torch.nn.Module, diagonals: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per module, the share of its importance that 2:4 drops."""
    out = {}
    for index, block in enumerate(model.model.layers):
        for half, names in MODULES.items():
            for name in names:
                W = getattr(getattr(block, half), name).weight.detach().float()
                out[f"{index}.{name}"] = dropped_share(importance(W, diagonals[f"{index}.{name}"]), 0.5, 2, 4).item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    path = prepare("smollm2")
    ids = calibration_windows("smollm2", path, args.nsamples, 0)
    batches = [{"input_ids": row.unsqueeze(0)} for row in ids]
    result: dict[str, object] = {"nsamples": args.nsamples, "steps": args.steps}
    for objective in ("entropy", "dropped"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            before = shares(model, input_diagonals(model, ids))
            started = time.perf_counter()
            learned = rotate_residual(model, batches, steps=args.steps, objective=objective, pattern=(0.5, 2, 4))
            seconds = time.perf_counter() - started
            after = shares(model, input_diagonals(model, ids))  # folded and rotated: the readers' inputs changed
        result[objective] = {"before": before, "after": after, "losses": learned.losses, "seconds": seconds}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "smollm2.json").write_text(json.dumps(result))
    print("| objective | module | 2:4 dropped share after / before, mean over blocks | lowest | highest |")
    print("|---|---|---|---|---|")
    for objective in ("entropy", "dropped"):
        entry = result[objective]
        assert isinstance(entry, dict)
        for name in (*MODULES["self_attn"], *MODULES["mlp"]):
            ratios = [entry["after"][k] / entry["before"][k] for k in entry["before"] if k.endswith(f".{name}")]
            print(f"| {objective} | {name} | {statistics.mean(ratios):.3f} | {min(ratios):.3f} | {max(ratios):.3f} |")


if __name__ == "__main__":
    main()
