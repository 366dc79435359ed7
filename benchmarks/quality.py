"""Quality / speed / memory of every method on SmolLM2-135M, over several calibration seeds.

    python benchmarks/quality.py run --method rose --sparsity 0.7 --seed 0     # one run -> JSON
    python benchmarks/quality.py all                                           # the whole grid
    python benchmarks/quality.py report                                        # table + plot

Each run is its own process so its peak RSS is its own. Results land in benchmarks/results/ as
JSON, one file per run; ``all`` skips runs already there, so it can be resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import ROOT, prepare, read_text

RESULTS = ROOT / "benchmarks" / "results"
TOKENS = ROOT / ".cache" / "tokens"


def tokens(name: str) -> torch.Tensor:
    """Token ids of a shared text under the SmolLM2 tokenizer (cached)."""
    TOKENS.mkdir(parents=True, exist_ok=True)
    path = TOKENS / f"{name}.pt"
    if path.is_file():
        return torch.load(path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepare())
    ids = torch.tensor(tokenizer(read_text(name), add_special_tokens=False).input_ids, dtype=torch.long)
    torch.save(ids, path)
    return ids


def run_name(label: str, pattern: str, sparsity: float | None, seed: int) -> str:
    amount = pattern.replace(":", "of") if pattern != "unstructured" else f"{sparsity:.2f}"
    return f"{label}_{amount}_seed{seed}"


def run_one(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    from rose_hf import RoseConfig, RosePruner
    from rose_hf.data import sample_windows
    from rose_hf.eval import perplexity, perplexity_windows

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(prepare(), dtype=torch.float32)
    calib = sample_windows(tokens(args.calib), args.nsamples, args.seqlen, seed=args.seed)
    evaluation = perplexity_windows(tokens(args.eval), args.seqlen)[: args.eval_windows]
    result: dict = {
        "method": args.method,
        "label": args.label or args.method,
        "pattern": args.pattern,
        "seed": args.seed,
    }
    if args.method != "dense":
        sparsity = None if args.pattern != "unstructured" else args.sparsity
        # the grid's rows ran before the default rotated (#14): "rose" stays ROSE without rotation
        extra = {"rotation": "none", **(json.loads(args.config) if args.config else {})}
        config = RoseConfig(sparsity=sparsity, pattern=args.pattern, method=args.method, seed=args.seed, **extra)
        start = time.perf_counter()
        report = RosePruner(model, config).prune(calib, progress=False)
        result["prune_seconds"] = time.perf_counter() - start
        result["report"] = report.to_dict()
        result["sparsity"] = report.overall_sparsity
        result["reordered"] = report.reordered_count
        result["modules"] = len(report.modules)
    else:
        result["sparsity"] = 0.0
    result["target_sparsity"] = args.sparsity if args.pattern == "unstructured" else None
    result["ppl"] = perplexity(model, evaluation)
    if args.calib_ppl:  # the calibration windows themselves: does a method fit them and fail to generalise?
        result["calib_ppl"] = perplexity(model, calib)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import rose_hf

    result["code"] = str(Path(rose_hf.__file__).parent)
    result["setup"] = {
        "calib": args.calib,
        "eval": args.eval,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "eval_windows": int(evaluation.shape[0]),
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    return result


VARIANTS = {
    "sparsegpt": ["--method", "sparsegpt"],
    "rose": ["--method", "rose", "--config", '{"reorder": "auto", "refine": "none"}'],
    "rose-always": [
        "--method",
        "rose",
        "--config",
        '{"reorder": "always", "refine": "none"}',
        "--label",
        "rose-always",
    ],
    "wanda": ["--method", "wanda"],
}

# Method experiments: not in the default grid; run with ``all --labels ... --amounts ... --code current``.
EXPERIMENTS = {
    "rose-dense": [
        "--method",
        "rose",
        "--config",
        '{"reorder": "always", "objective": "dense"}',
        "--label",
        "rose-dense",
    ],
    # The same with a ridge-sized dampening of the correction (as large as the mean input energy).
    "rose-dense-ridge": [
        "--method",
        "rose",
        "--config",
        '{"reorder": "always", "objective": "dense", "correction_damp": 1.0}',
        "--label",
        "rose-dense-ridge",
    ],
    # rose_hf's SparseGPT and ROSE (every module reordered, the default then) re-run on the current code: the grid above ran on a snapshot,
    # and code changes that only reorder float operations move single runs by a few percent.
    "sparsegpt-current": ["--method", "sparsegpt", "--label", "sparsegpt-current"],
    "rose-current": [
        "--method",
        "rose",
        "--config",
        '{"reorder": "always", "refine": "none"}',
        "--label",
        "rose-current",
    ],
    "rose-dense-current": [
        "--method",
        "rose",
        "--config",
        '{"reorder": "always", "objective": "dense"}',
        "--label",
        "rose-dense-current",
    ],
    # true_sequential=True: each module pruned on the inputs of the block's already-pruned modules.
    "sparsegpt-sequential": [
        "--method",
        "sparsegpt",
        "--config",
        '{"true_sequential": true}',
        "--label",
        "sparsegpt-sequential",
    ],
    "rose-sequential": [
        "--method",
        "rose",
        "--config",
        '{"reorder": "always", "true_sequential": true, "refine": "none"}',
        "--label",
        "rose-sequential",
    ],
}
VARIANTS_AND_EXPERIMENTS = {**VARIANTS, **EXPERIMENTS}
AMOUNTS = ("0.7", "0.6", "2:4", "0.8", "0.5")


def grid(
    seeds: list[int], labels: tuple[str, ...] = tuple(VARIANTS), amounts: tuple[str, ...] = AMOUNTS
) -> list[list[str]]:
    """Command-line argument lists for every run of the standard grid, most informative first."""
    runs: list[list[str]] = [["--method", "dense", "--seed", "0"]]
    for amount in sorted(amounts):
        where = ["--pattern", amount] if ":" in amount else ["--sparsity", amount]
        runs.append(["--method", "magnitude", *where, "--seed", "0"])

    def add(amounts: tuple[str, ...], labels: tuple[str, ...]) -> None:
        for amount in amounts:
            where = ["--pattern", amount] if ":" in amount else ["--sparsity", amount]
            for seed in seeds:
                for label in labels:
                    runs.append([*VARIANTS_AND_EXPERIMENTS[label], *where, "--seed", str(seed)])

    unknown = sorted(set(labels) - set(VARIANTS_AND_EXPERIMENTS))
    if unknown:
        raise SystemExit(f"unknown labels {unknown}; choose from {sorted(VARIANTS_AND_EXPERIMENTS)}.")
    add(amounts, tuple(label for label in VARIANTS_AND_EXPERIMENTS if label in labels))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="one run, JSON to --out (or stdout)")
    one.add_argument("--method", default="rose", choices=["dense", "rose", "sparsegpt", "wanda", "magnitude"])
    one.add_argument("--sparsity", type=float, default=0.7)
    one.add_argument("--pattern", default="unstructured")
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--config", default="", help="extra RoseConfig fields as JSON")
    one.add_argument("--label", default="", help="name of this variant in the results (with --config)")
    one.add_argument("--out", type=Path)
    one.add_argument("--calib-ppl", action="store_true", help="also the perplexity on the calibration windows")
    all_runs = sub.add_parser("all", help="the whole grid, resumable")
    all_runs.add_argument("--seeds", default="0,1,2")
    all_runs.add_argument(
        "--reuse-snapshot", action="store_true", help="resume with the code snapshot of an earlier run"
    )
    all_runs.add_argument("--labels", default=",".join(VARIANTS), help="which methods to run, comma-separated")
    all_runs.add_argument("--amounts", default=",".join(AMOUNTS), help="sparsities and patterns, comma-separated")
    all_runs.add_argument(
        "--code",
        choices=["snapshot", "current"],
        default="snapshot",
        help="snapshot: a copy of src/ (see --reuse-snapshot); current: src/ as it is (for experiments)",
    )
    all_runs.add_argument("--shard", default="0/1", help="K/N: only every N-th run from the K-th (parallel drivers)")
    for p in (one, all_runs):
        p.add_argument("--calib", default="wikitext2-valid")
        p.add_argument("--eval", default="wikitext2-test")
        p.add_argument("--nsamples", type=int, default=32)
        p.add_argument("--seqlen", type=int, default=512)
        p.add_argument("--eval-windows", type=int, default=40)
        p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.command == "run":
        result = run_one(args)
        text = json.dumps(result, indent=1, sort_keys=True)
        if args.out:
            args.out.write_text(text)
        else:
            print(text)
        return
    amounts = tuple(args.amounts.split(","))
    bad = [a for a in amounts if a not in AMOUNTS]
    if bad:
        raise SystemExit(f"unknown amounts {bad}; choose from {', '.join(AMOUNTS)}.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    prepare()
    shared = [
        "--calib",
        args.calib,
        "--eval",
        args.eval,
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--eval-windows",
        str(args.eval_windows),
        "--threads",
        str(args.threads),
    ]
    # Every run of one grid measures the same code: a snapshot of src/ taken now, first on the path.
    snapshot = ROOT / ".cache" / "grid_src"
    if args.code == "current":
        snapshot = ROOT / "src"
    elif not (args.reuse_snapshot and snapshot.is_dir()):
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(ROOT / "src", snapshot)
    env = {**os.environ, "PYTHONPATH": str(snapshot)}
    part, parts = (int(x) for x in args.shard.split("/"))
    labels = tuple(args.labels.split(","))
    for argv in grid([int(s) for s in args.seeds.split(",")], labels, amounts)[part::parts]:
        values = dict(zip(argv[::2], argv[1::2]))
        pattern = values.get("--pattern", "unstructured")
        label = values.get("--label", values["--method"])
        name = run_name(label, pattern, float(values.get("--sparsity", 0.0)), int(values["--seed"]))
        out = RESULTS / f"{name}.json"
        if out.is_file():
            continue
        start = time.time()
        subprocess.run([sys.executable, __file__, "run", *argv, *shared, "--out", str(out)], check=True, env=env)
        print(f"{name}: {json.loads(out.read_text())['ppl']:.2f} ({time.time() - start:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
