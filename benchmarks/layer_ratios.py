"""Per-layer evidence from the recipe runs: each module type's layer error against a base recipe's.

    python benchmarks/layer_ratios.py --model smollm2 --amount 2of4 --base rose-auto-admm \\
        --labels rose-auto-admm-heads,rose-auto-admm-residual,rose-auto-admm-layer

Reads benchmarks/results/recipes/<model>_<label>_<amount>_seed<s>.json (``recipes.py run`` writes
them, each module's relative layer error ``‖(W − Ŵ)X‖ / ‖WX‖`` on its calibration inputs) and prints,
per label and module type, the mean over blocks and the seeds both labels ran of the error over the
base recipe's for the same module and seed: below 1, that recipe pruned the module with less error.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RECIPES = Path(__file__).resolve().parent / "results" / "recipes"
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def errors(model: str, label: str, amount: str) -> dict[int, dict[str, float]]:
    """Seed -> module name -> relative layer error."""
    found = {}
    for path in sorted(RECIPES.glob(f"{model}_{label}_{amount}_seed*.json")):
        run = json.loads(path.read_text())
        found[run["seed"]] = {name: error for name, error, *_ in run["modules"]}
    return found


def ratios(model: str, base: str, label: str, amount: str) -> tuple[dict[str, float], list[int]]:
    """Per module type, the mean ratio of ``label``'s error over ``base``'s; the seeds compared."""
    ours, theirs = errors(model, label, amount), errors(model, base, amount)
    seeds = sorted(set(ours) & set(theirs))
    if not seeds:
        raise SystemExit(
            f"no seed of {label!r} and {base!r} both ran at --amount {amount} on {model!r} in {RECIPES}; "
            "check the names (amounts as in the file names: 0.5, 0.7, 2of4) or run recipes.py run first."
        )
    by_type: dict[str, list[float]] = {}
    for seed in seeds:
        for name, error in theirs[seed].items():
            if name in ours[seed] and error > 0:
                by_type.setdefault(name.rsplit(".", 1)[-1], []).append(ours[seed][name] / error)
    return {kind: statistics.mean(values) for kind, values in by_type.items()}, seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--amount", required=True, help="as in the file names: 0.5, 0.7, 2of4")
    parser.add_argument("--base", required=True)
    parser.add_argument("--labels", required=True, help="comma-separated recipe labels")
    args = parser.parse_args()
    print(f"| recipe (against {args.base}) | seeds | " + " | ".join(f"`{t}`" for t in TYPES) + " |")
    print("|---|---|" + "---|" * len(TYPES))
    for label in args.labels.split(","):
        means, seeds = ratios(args.model, args.base, label, args.amount)
        cells = " | ".join(f"{means[t]:.2f}" if t in means else "—" for t in TYPES)
        print(f"| `{label}` | {','.join(map(str, seeds))} | {cells} |")


if __name__ == "__main__":
    main()
