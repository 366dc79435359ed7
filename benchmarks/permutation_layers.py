"""Per layer: does ``channel_permutation=True`` lower the N:M layer error of ``o_proj`` and ``down_proj``?

For a few decoder blocks of a real model, the dense model's Hessians on three token sets (the
calibration windows, WikiText-2 test, tiny-shakespeare; as in layer_domains.py) give, per module,
the permutation the library would choose from the calibration Hessian (``rose_hf.permutation``:
for ``down_proj`` any order of the MLP's channels, for ``o_proj`` one order per key/value head
shared by its query heads) and the module pruned by each variant (SparseGPT; the default recipe) in
the original and in the permuted column order. The relative layer error ``tr(ΔHΔᵀ) / tr(WHWᵀ)``
does not depend on the column order itself, so the two compare directly, on each token set.

    python benchmarks/permutation_layers.py run --model smollm2 [--amount 2:4] [--seed 0]
    python benchmarks/permutation_layers.py report      # the table of docs/algorithm.md

Output: benchmarks/results/permutation_layers/<model>_<amount>_seed<seed>.json.
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
from layer_domains import BLOCKS, SETS, VARIANTS, dense_hessians
from smollm2 import ROOT

from rose_hf.permutation import balance_permutation, expand_head_permutation, head_permutation, permutation_cost
from rose_hf.permuting import ROUNDS
from rose_hf.rotating import attentions
from rose_hf.rotation import importance
from rose_hf.sparsegpt import inverse_hessian

RESULTS = ROOT / "benchmarks" / "results" / "permutation_layers"
LABELS = ("sparsegpt", "rose-auto-admm")


def run(args: argparse.Namespace) -> None:
    model, data, p, n, m = dense_hessians(args)
    layers = model.get_decoder().layers
    records = []
    for index in BLOCKS[args.model]:
        (attention,) = attentions(layers[index])
        for name, entry in data.items():
            if not name.startswith(f"model.layers.{index}.") or not name.endswith(("o_proj", "down_proj")):
                continue
            W, H = entry["W"], entry["calib"]
            S = importance(W, torch.diagonal(inverse_hessian(H, 0.01)))
            generator = torch.Generator().manual_seed(args.seed + index)
            started = time.perf_counter()
            if name.endswith("o_proj"):
                perm = head_permutation(S, attention.heads, attention.kv_heads, n, m, ROUNDS, generator)
                order = expand_head_permutation(perm, attention.heads)[1]
            else:
                order = balance_permutation(S, n, m, ROUNDS, generator)
            seconds = time.perf_counter() - started
            identity = torch.arange(W.shape[1])
            row: dict = {
                "name": name,
                "seconds": seconds,
                "cost": [permutation_cost(S, identity, n, m), permutation_cost(S, order, n, m)],
                "errors": {},
            }
            dense = {s: float(((W @ entry[s]) * W).sum()) for s in SETS}
            for label in LABELS:
                for basis, columns in (("plain", identity), ("permuted", order)):
                    W_hat = VARIANTS[label](W[:, columns], H[columns][:, columns], p, n, m)[:, torch.argsort(columns)]
                    D = W_hat - W
                    row["errors"][f"{label}/{basis}"] = {s: float(((D @ entry[s]) * D).sum()) / dense[s] for s in SETS}
            records.append(row)
            ratios = {
                label: row["errors"][f"{label}/permuted"]["calib"] / row["errors"][f"{label}/plain"]["calib"]
                for label in LABELS
            }
            print(name, {k: round(v, 3) for k, v in ratios.items()}, f"{seconds:.1f}s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.model}_{args.amount.replace(':', 'of')}_seed{args.seed}.json"
    out.write_text(json.dumps({"model": args.model, "amount": args.amount, "seed": args.seed, "modules": records}))


def report() -> list[str]:
    """Per model, module kind and variant: mean ratio of the permuted order's error to the original's."""
    lines = [
        "| model | amount | module | variant | calibration text | WikiText-2 test | tiny-shakespeare | N:M cost after / before | search s per module |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for file in sorted(RESULTS.glob("*.json")):
        r = json.loads(file.read_text())
        for kind in ("o_proj", "down_proj"):
            rows = [x for x in r["modules"] if x["name"].endswith(kind)]
            cost = statistics.mean(x["cost"][1] / x["cost"][0] for x in rows)
            seconds = statistics.mean(x["seconds"] for x in rows)
            for label in LABELS:
                ratios = [
                    statistics.mean(
                        x["errors"][f"{label}/permuted"][s] / x["errors"][f"{label}/plain"][s] for x in rows
                    )
                    for s in SETS
                ]
                lines.append(
                    f"| {r['model']} | {r['amount']} | {kind} | {label} | "
                    + " | ".join(f"{v:.3f}" for v in ratios)
                    + f" | {cost:.3f} | {seconds:.1f} |"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run")
    one.add_argument("--model", choices=sorted(BLOCKS), required=True)
    one.add_argument("--amount", default="2:4")
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--threads", type=int, default=1)
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        print("\n".join(report()))


if __name__ == "__main__":
    main()
