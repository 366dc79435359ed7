"""Per-layer generalisation: does a step that lowers the calibration layer error lower it on other text?

For a few decoder blocks of a real model, one forward of the *dense* model collects every target
module's Hessian on three token sets: the calibration windows (WikiText-2 valid, 32 × 512, seeded,
as in recipes.py), held-out text of the same domain (WikiText-2 test) and another domain
(tiny-shakespeare), 16 × 512 each. Each module's ``(W, H_calib)`` is then pruned by every variant,
and the relative layer error ``tr(ΔHΔᵀ) / tr(WHWᵀ)`` of the result is measured under each of the
three Hessians.

    python benchmarks/layer_domains.py --model gemma3 --sparsity 0.7 --seed 0 [--variants a,b]

Output: benchmarks/results/layer_domains/<model>_<amount>_seed<seed>.json; ``report`` prints the
mean ratio of each variant's error to SparseGPT's per module kind and token set, the table that
``recipes.py report`` puts into docs/recipes.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import prepare
from recipes import _tokens, calibration_windows
from smollm2 import ROOT

from rose_hf import admm
from rose_hf.eval import bos_token_for, perplexity_windows
from rose_hf.modeling import find_blocks, target_modules, weight_matrix
from rose_hf.ordering import rose_decision
from rose_hf.refit import refit_weights
from rose_hf.sparsegpt import sparsegpt_prune

RESULTS = ROOT / "benchmarks" / "results" / "layer_domains"
BLOCKS = {"smollm2": (0, 6, 12, 18, 24, 29), "gemma3": (0, 3, 7, 10, 14, 17)}
SETS = ("calib", "test", "ood")

Variant = Callable[[torch.Tensor, torch.Tensor, float, int, int], torch.Tensor]


def _sparsegpt(percdamp: float = 0.01, reorder: str = "never") -> Variant:
    def run(W: torch.Tensor, H: torch.Tensor, p: float, n: int, m: int) -> torch.Tensor:
        perm = blocks = None
        if reorder != "never":
            order = rose_decision(W, H, p, 128, n=n, m=m, mode=reorder, percdamp=percdamp).order
            if order is not None:
                perm, blocks = order.perm, order.blocks
        return sparsegpt_prune(W, H, p, n=n, m=m, percdamp=percdamp, perm=perm, blocks=blocks).weight

    return run


ITERATIONS: dict[str, int] = {}  # ADMM iterations of the last module, per variant


def _then(first: Variant, step: str, percdamp: float = 0.01, label: str = "", **options: int) -> Variant:
    """``first``, then the re-fit or ADMM; ``options`` go to ``admm_prune`` (``refit_iters``), or
    ``check_every`` / ``min_iters`` replace the schedule's constants for this call."""

    def run(W: torch.Tensor, H: torch.Tensor, p: float, n: int, m: int) -> torch.Tensor:
        start = first(W, H, p, n, m)
        if step == "refit":
            return refit_weights(W, H, start, percdamp=percdamp)
        saved = admm.CHECK_EVERY, admm.MIN_ITERS
        admm.CHECK_EVERY = options.get("check_every", saved[0])
        admm.MIN_ITERS = options.get("min_iters", saved[1])
        try:
            result = admm.admm_prune(
                W, H, start, n=n, m=m, percdamp=percdamp, **{k: v for k, v in options.items() if k == "refit_iters"}
            )
        finally:
            admm.CHECK_EVERY, admm.MIN_ITERS = saved
        ITERATIONS[label] = result.iterations
        return result.weight

    return run


VARIANTS: dict[str, Variant] = {
    "sparsegpt": _sparsegpt(),
    "rose": _sparsegpt(reorder="always"),
    "rose-auto": _sparsegpt(reorder="auto"),
    "sparsegpt-refit": _then(_sparsegpt(), "refit"),
    "sparsegpt-admm": _then(_sparsegpt(), "admm", label="sparsegpt-admm"),
    # ADMM as first written: ALPS's check every 3 iterations (at least 30), and its final re-fit.
    "sparsegpt-admm-every3": _then(_sparsegpt(), "admm", label="sparsegpt-admm-every3", check_every=3, min_iters=30),
    "sparsegpt-admm-refit": _then(_sparsegpt(), "admm", label="sparsegpt-admm-refit", refit_iters=50),
    "rose-auto-admm": _then(_sparsegpt(reorder="auto"), "admm", label="rose-auto-admm"),  # the default recipe
    "rose-auto-admm-d0.1": _then(_sparsegpt(percdamp=0.1, reorder="auto"), "admm", 0.1, label="rose-auto-admm-d0.1"),
}


def collect(model: torch.nn.Module, blocks: tuple[int, ...], sets: dict[str, torch.Tensor]) -> dict:
    """``{module name: {set: H}}`` from dense forwards, plus each module's weight."""
    path, layers = find_blocks(model)
    modules = {}
    for index in blocks:
        modules.update(target_modules(layers[index], f"{path}.{index}", None, []))
    sums: dict[str, dict[str, list]] = {name: {} for name in modules}
    current = {"set": ""}

    def hook(name: str) -> Callable:
        def pre(module: torch.nn.Module, args: tuple) -> None:
            X = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            entry = sums[name].setdefault(current["set"], [torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64), 0])
            entry[0] += X.T @ X
            entry[1] += X.shape[0]

        return pre

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            for key, ids in sets.items():
                current["set"] = key
                for row in ids:
                    model(row.unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: {
            "W": weight_matrix(module).detach().to(torch.float32),
            **{k: (2 * total / count).to(torch.float32) for k, (total, count) in sums[name].items()},
        }
        for name, module in modules.items()
    }


def dense_hessians(args: argparse.Namespace) -> tuple[torch.nn.Module, dict, float, int, int]:
    """The dense model, its ``collect`` data on the three token sets, and ``(p, n, m)`` of ``args.amount``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    path = prepare(args.model)
    bos = bos_token_for(AutoTokenizer.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    calib = calibration_windows(args.model, path, 32, args.seed)
    sets = {
        "calib": calib,
        "test": perplexity_windows(_tokens(args.model, path, "wikitext2-test"), 512, bos)[:16],
        "ood": perplexity_windows(_tokens(args.model, path, "shakespeare"), 512, bos)[:16],
    }
    n, m = (2, 4) if args.amount == "2:4" else (0, 0)
    return model, collect(model, BLOCKS[args.model], sets), 0.5 if m else float(args.amount), n, m


def run(args: argparse.Namespace) -> None:
    _, data, p, n, m = dense_hessians(args)
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    records = []
    for name, entry in data.items():
        W = entry["W"]
        row: dict = {"name": name, "shape": list(W.shape), "errors": {}, "seconds": {}}
        dense = {s: float(((W @ entry[s]) * W).sum()) for s in SETS}
        for label in names:
            started = time.perf_counter()
            W_hat = VARIANTS[label](W, entry["calib"], p, n, m)
            row["seconds"][label] = time.perf_counter() - started
            if label in ITERATIONS:
                row.setdefault("iterations", {})[label] = ITERATIONS.pop(label)
            D = W_hat - W
            row["errors"][label] = {s: float(((D @ entry[s]) * D).sum()) / dense[s] for s in SETS}
        records.append(row)
        print(name, {k: round(v["ood"] / row["errors"]["sparsegpt"]["ood"], 3) for k, v in row["errors"].items()})
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.model}_{args.amount.replace(':', 'of')}_seed{args.seed}.json"
    out.write_text(json.dumps({"model": args.model, "amount": args.amount, "seed": args.seed, "modules": records}))


NAMES = {"calib": "calibration text", "test": "WikiText-2 test", "ood": "tiny-shakespeare"}


def summary() -> list[str]:
    """Markdown: per model, the mean ratio of each variant's relative layer error to SparseGPT's,
    per module kind and token set (docs/recipes.md carries it)."""
    lines: list[str] = []
    for file in sorted(RESULTS.glob("*.json")):
        data = json.loads(file.read_text())
        labels = [label for label in data["modules"][0]["errors"] if label != "sparsegpt"]
        blocks = sorted({int(r["name"].split(".")[2]) for r in data["modules"]})
        lines += [
            "",
            f"### {data['model']} {data['amount']}, seed {data['seed']}, blocks {', '.join(map(str, blocks))}",
            "",
            "| module | tokens | " + " | ".join(labels) + " |",
            "|---|---|" + "---|" * len(labels),
        ]
        kinds = sorted({r["name"].rsplit(".", 1)[-1] for r in data["modules"]})
        for kind in [*kinds, "all"]:
            rows = [r for r in data["modules"] if kind == "all" or r["name"].endswith("." + kind)]
            for s in SETS:
                ratios = [
                    statistics.mean(r["errors"][label][s] / r["errors"]["sparsegpt"][s] for r in rows)
                    for label in labels
                ]
                lines.append(f"| {kind} | {NAMES[s]} | " + " | ".join(f"{x:.3f}" for x in ratios) + " |")
        seconds = {label: sum(r["seconds"][label] for r in data["modules"]) for label in ["sparsegpt", *labels]}
        lines += [
            "",
            "Seconds for these modules (one thread): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) + ".",
        ]
        counts = {
            label: [r["iterations"][label] for r in data["modules"]] for label in data["modules"][0]["iterations"]
        }
        lines.append(
            "ADMM iterations per module: " + ", ".join(f"{k} {min(v)}–{max(v)}" for k, v in counts.items()) + "."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run")
    one.add_argument("--model", choices=sorted(BLOCKS), required=True)
    one.add_argument("--amount", default="0.7")
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--variants", default="")
    one.add_argument("--threads", type=int, default=1)
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        print("\n".join(summary()))


if __name__ == "__main__":
    main()
