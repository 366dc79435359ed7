"""Probe: would one channel order of the residual stream, shared by every block, balance 2:4 groups?

A permutation of the residual stream's channels commutes with RMSNorm (its weight is permuted with
it), so one order for the embeddings, every block's readers (q/k/v, gate/up columns) and writers
(o_proj/down_proj rows), every norm and the head is exact and merges into a plain checkpoint, Gemma's
sandwich norms included. This measures only the search's own objective: per reader, the SparseGPT
importance its 2:4 groups drop (the dense model's Hessians, each module's importance normalised to
sum 1 so each counts once), in the best shared order ``balance_permutation`` finds over the original
order. Nothing is pruned and nothing is built in rose_hf from it.

    python benchmarks/residual_order_probe.py --model smollm2 [--rounds 50]

Output: benchmarks/results/residual_order_probe/<model>.json; the run prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import MODELS, prepare
from recipes import calibration_windows
from smollm2 import ROOT

from rose_hf.permutation import balance_permutation, permutation_cost
from rose_hf.rotation import importance
from rose_hf.sparsegpt import inverse_hessian

RESULTS = ROOT / "benchmarks" / "results" / "residual_order_probe"
READERS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


def input_hessians(model: torch.nn.Module, ids: torch.Tensor, watched: dict[Any, torch.nn.Module]) -> dict:
    """Per key of ``watched``, ``2/N XᵀX`` of what its module reads, from one dense forward."""
    sums: dict[Any, tuple[torch.Tensor, int]] = {}

    def hook(key: Any):  # type: ignore[no-untyped-def]
        def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            total, count = sums.get(key, (torch.zeros(x.shape[1], x.shape[1]), 0))
            sums[key] = (total + x.T @ x, count + x.shape[0])

        return record

    handles = [module.register_forward_pre_hook(hook(key)) for key, module in watched.items()]
    with torch.no_grad():
        for start in range(0, len(ids), 4):
            model(ids[start : start + 4])
    for handle in handles:
        handle.remove()
    return {key: 2 / count * total for key, (total, count) in sums.items()}


def reader_hessians(model: torch.nn.Module, ids: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Per block and half, ``2/N XᵀX`` of what its readers read, from one dense forward."""
    watched = {
        (index, half): getattr(getattr(block, half), names[0])
        for index, block in enumerate(model.model.layers)
        for half, names in READERS.items()
    }
    return input_hessians(model, ids, watched)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    path = prepare(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = calibration_windows(args.model, path, 32, 0)
    hessians = reader_hessians(model, ids)
    scores, labels = [], []
    for (index, half), H in sorted(hessians.items()):
        diagonal = torch.diagonal(inverse_hessian(H, 0.01))
        for name in READERS[half]:
            W = getattr(getattr(model.model.layers[index], half), name).weight.detach().float()
            S = importance(W, diagonal)
            scores.append(S / S.sum())
            labels.append((index, name, S.shape[0]))
    stacked = torch.cat(scores)
    started = time.perf_counter()
    order = balance_permutation(stacked, 2, 4, args.rounds, torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - started
    identity = torch.arange(stacked.shape[1])
    ratios: dict[str, list[float]] = {}
    row = 0
    for _index, name, rows in labels:
        S = stacked[row : row + rows]
        row += rows
        ratios.setdefault(name, []).append(permutation_cost(S, order, 2, 4) / permutation_cost(S, identity, 2, 4))
    result = {"model": args.model, "rounds": args.rounds, "search_seconds": seconds, "ratios": ratios}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.model}.json").write_text(json.dumps(result))
    print("| module | 2:4 cost after / before, mean over blocks | lowest | highest |")
    print("|---|---|---|---|")
    for name, values in ratios.items():
        print(f"| {name} | {statistics.mean(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
    print(f"search: {seconds:.0f} s for {args.rounds} rounds over {stacked.shape[0]} rows")


if __name__ == "__main__":
    main()
