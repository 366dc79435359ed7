"""Per layer: does rotation="heads" lower the layer error of v_proj and o_proj, on every token set?

For a few decoder blocks of a real model, the dense model's Hessians of ``v_proj`` and ``o_proj``
on three token sets (the calibration windows, WikiText-2 test, tiny-shakespeare; as in
layer_domains.py) give, per attention module: the head rotations learned on the calibration
Hessians (``rose_hf.rotation``, ``--steps`` Adam steps), then ``v_proj`` and ``o_proj`` pruned by
each variant (SparseGPT; the default recipe) in the original and in the rotated basis. The relative
layer error ``tr(ΔHΔᵀ) / tr(WHWᵀ)`` is invariant to the rotation itself, so the two bases compare
directly, on each token set.

    python benchmarks/rotation_layers.py run --model smollm2 --amount 0.7 [--steps 100] [--objective entropy]
    (other steps or objective, rose_hf.rotation's "dropped": own file)
    python benchmarks/rotation_layers.py report      # the table of docs/benchmarks.md

Output: benchmarks/results/rotation_layers/<model>_<amount>_seed<seed>.json.
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

from rose_hf.rotating import attentions
from rose_hf.rotation import fuse_head_rotations, head_blocks, learn_head_rotations
from rose_hf.sparsegpt import inverse_hessian

RESULTS = ROOT / "benchmarks" / "results" / "rotation_layers"
LABELS = ("sparsegpt", "rose-auto-admm")


def _inverse(H: torch.Tensor) -> torch.Tensor:
    return inverse_hessian(H, 0.01)


def run(args: argparse.Namespace) -> None:
    model, data, p, n, m = dense_hessians(args)
    layers = model.get_decoder().layers
    records = []
    for index in BLOCKS[args.model]:
        (attention,) = attentions(layers[index])
        prefix = next(name for name in data if name.startswith(f"model.layers.{index}.") and name.endswith("v_proj"))
        v, o = data[prefix], data[prefix.replace("v_proj", "o_proj")]
        started = time.perf_counter()
        R, losses = learn_head_rotations(
            v["W"],
            _inverse(v["calib"]),
            o["W"],
            _inverse(o["calib"]),
            attention.kv_heads,
            attention.heads,
            args.steps,
            objective=args.objective,
            pattern=(p, n, m),
        )
        seconds = time.perf_counter() - started
        Wv_rot, _, Wo_rot = fuse_head_rotations(v["W"], None, o["W"], R, attention.heads)
        B = head_blocks(R, attention.heads)
        rotated = {
            "v_proj": {"W": Wv_rot, **{s: v[s] for s in SETS}},
            "o_proj": {"W": Wo_rot, **{s: B.T @ o[s] @ B for s in SETS}},
        }
        row: dict = {"block": index, "loss": [losses[0], losses[-1]], "seconds": seconds, "errors": {}}
        for kind, plain in (("v_proj", v), ("o_proj", o)):
            for basis, entry in (("plain", plain), ("heads", rotated[kind])):
                W = entry["W"]
                dense = {s: float(((W @ entry[s]) * W).sum()) for s in SETS}
                for label in LABELS:
                    D = VARIANTS[label](W, entry["calib"], p, n, m) - W
                    row["errors"][f"{kind}/{label}/{basis}"] = {
                        s: float(((D @ entry[s]) * D).sum()) / dense[s] for s in SETS
                    }
        records.append(row)
        print(index, {k: round(e["calib"], 4) for k, e in row["errors"].items()}, f"{seconds:.1f}s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    steps = "" if args.steps == 100 else f"_steps{args.steps}"  # 100: the default, rotation_steps
    steps += "" if args.objective == "entropy" else f"_{args.objective}"  # entropy: the default objective
    out = RESULTS / f"{args.model}_{args.amount.replace(':', 'of')}_seed{args.seed}{steps}.json"
    result = {
        "model": args.model,
        "amount": args.amount,
        "seed": args.seed,
        "steps": args.steps,
        "objective": args.objective,
        "blocks": records,
    }
    out.write_text(json.dumps(result))


def report() -> list[str]:
    """Per model, amount, module and variant: mean ratio of the rotated basis's error to the plain one's."""
    lines = [
        "| model | amount | steps | objective | module | variant | calibration text | WikiText-2 test | tiny-shakespeare | loss after / before | learning s per block |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for file in sorted(RESULTS.glob("*.json")):
        r = json.loads(file.read_text())
        blocks = r["blocks"]
        loss = statistics.mean(b["loss"][1] / b["loss"][0] for b in blocks)
        seconds = statistics.mean(b["seconds"] for b in blocks)
        for kind in ("v_proj", "o_proj"):
            for label in LABELS:
                ratios = [
                    statistics.mean(
                        b["errors"][f"{kind}/{label}/heads"][s] / b["errors"][f"{kind}/{label}/plain"][s]
                        for b in blocks
                    )
                    for s in SETS
                ]
                lines.append(
                    f"| {r['model']} | {r['amount']} | {r['steps']} | {r.get('objective', 'entropy')} | {kind} | {label} | "
                    + " | ".join(f"{x:.3f}" for x in ratios)
                    + f" | {loss:.3f} | {seconds:.1f} |"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run")
    one.add_argument("--model", choices=sorted(BLOCKS), required=True)
    one.add_argument("--amount", default="0.7")
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--steps", type=int, default=100)
    one.add_argument("--objective", choices=("entropy", "dropped"), default="entropy")
    one.add_argument("--threads", type=int, default=1)
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        print("\n".join(report()))


if __name__ == "__main__":
    main()
