"""Recipes on two real models and two text domains, over calibration seeds (issue: a default that
generalises).

    python benchmarks/recipes.py run --model gemma3 --label rose-best --amount 0.7 --seed 0
    python benchmarks/recipes.py all --models smollm2,gemma3 --amounts 0.7 --seeds 0,1,2 [--shard 0/2]
    python benchmarks/recipes.py report        # writes docs/recipes.md from benchmarks/results/recipes/

Every run calibrates on WikiText-2 valid (32 seeded windows of 512 tokens) and is evaluated on the
first 40 windows of 512 of WikiText-2 test (the calibration's domain) and of tiny-shakespeare
(another domain), each window starting with BOS when the model's tokenizer puts one first (Gemma).
Each run is its own process, so its peak RSS (VmHWM) is its own; ``all`` skips runs already done.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import MODELS, prepare
from smollm2 import ROOT, peak_rss_mib, read_text

RESULTS = ROOT / "benchmarks" / "results" / "recipes"
DOC = ROOT / "docs" / "recipes.md"
DOMAINS = {"wikitext2": "wikitext2-test", "shakespeare": "shakespeare"}
LABELS = {
    "dense": {},
    "sparsegpt": {"method": "sparsegpt"},
    "rose": {"method": "rose", "reorder": "always", "refine": "none"},  # every module reordered (the default until #13)
    "rose-auto": {"method": "rose", "reorder": "auto", "refine": "none"},
    "rose-best": {"method": "rose", "reorder": "best", "refine": "none"},
    "sparsegpt-refit": {"method": "sparsegpt", "refine": "refit"},
    "rose-refit": {"method": "rose", "reorder": "always", "refine": "refit"},
    "rose-best-refit": {"method": "rose", "reorder": "best", "refine": "refit"},
    "rose-auto-refit": {"method": "rose", "reorder": "auto", "refine": "refit"},
    "sparsegpt-admm": {"method": "sparsegpt", "refine": "admm"},
    "rose-auto-admm": {"method": "rose", "reorder": "auto", "refine": "admm"},
    "rose-auto-admm-d0.1": {"method": "rose", "reorder": "auto", "refine": "admm", "percdamp": 0.1},
    "sparsegpt-owl": {"method": "sparsegpt", "allocation": "owl"},
    "sparsegpt-error": {"method": "sparsegpt", "allocation": "error"},
    "rose-auto-admm-owl": {"method": "rose", "reorder": "auto", "refine": "admm", "allocation": "owl"},
    "rose-auto-admm-error": {"method": "rose", "reorder": "auto", "refine": "admm", "allocation": "error"},
    "rose-owl": {"method": "rose", "reorder": "always", "allocation": "owl", "refine": "none"},
    "rose-auto-admm-heads": {"method": "rose", "reorder": "auto", "refine": "admm", "rotation": "heads"},
    "sparsegpt-heads": {"method": "sparsegpt", "rotation": "heads"},
    "rose-auto-admm-residual": {"method": "rose", "reorder": "auto", "refine": "admm", "rotation": "residual"},
    "rose-auto-admm-residual-heads": {
        "method": "rose",
        "reorder": "auto",
        "refine": "admm",
        "rotation": "residual+heads",
    },
    "sparsegpt-residual": {"method": "sparsegpt", "rotation": "residual"},
    "rose-auto-admm-perm": {"method": "rose", "reorder": "auto", "refine": "admm", "channel_permutation": True},
    "rose-auto-admm-heads-perm": {
        "method": "rose",
        "reorder": "auto",
        "refine": "admm",
        "rotation": "heads",
        "channel_permutation": True,
    },
    "rose-auto-admm-heads-perm-400": {  # four times the default rotation_steps
        "method": "rose",
        "reorder": "auto",
        "refine": "admm",
        "rotation": "heads",
        "channel_permutation": True,
        "rotation_steps": 400,
    },
    "sparsegpt-perm": {"method": "sparsegpt", "channel_permutation": True},
    "rose-auto-admm-layer": {"method": "rose", "reorder": "auto", "refine": "admm", "rotation": "layer"},
    "sparsegpt-layer": {"method": "sparsegpt", "rotation": "layer"},
    "rose-auto-admm-heads-dropped": {  # the head rotations learn to lower the share of importance 2:4 drops
        "method": "rose",
        "reorder": "auto",
        "refine": "admm",
        "rotation": "heads",
        "rotation_objective": "dropped",
    },
    "sparsegpt-heads-dropped": {"method": "sparsegpt", "rotation": "heads", "rotation_objective": "dropped"},
    "rose-auto-admm-residual-dropped": {  # the shared residual rotation learns the dropped share instead
        "method": "rose",
        "reorder": "auto",
        "refine": "admm",
        "rotation": "residual",
        "rotation_objective": "dropped",
    },
    # Experiment: the residual rotation's norm folding alone (R = I merged): is the folding its cost?
    "rose-auto-admm-residual-foldonly": {
        "method": "rose",
        "reorder": "auto",
        "refine": "admm",
        "rotation": "residual",
        "_fold_only": True,
    },
    # Experiment: leave each window's first token (BOS on Gemma, with its massive activations) out of
    # H and of ROSE's column norms; the forward itself still sees it.
    "sparsegpt-skipfirst": {"method": "sparsegpt", "_skip_first": True},
    "rose-skipfirst": {"method": "rose", "reorder": "always", "_skip_first": True, "refine": "none"},
    # Experiment: ROSE's order on the attention projections only, or on the MLP only (SparseGPT's
    # order elsewhere), to find which modules reordering helps or hurts.
    "rose-attn-only": {"method": "rose", "reorder": "always", "_reorder_only": r"self_attn\.", "refine": "none"},
    "rose-mlp-only": {"method": "rose", "reorder": "always", "_reorder_only": r"mlp\.", "refine": "none"},
}
for _recipe in LABELS.values():  # a label names what it ran: the default rotation became "heads" (#14)
    if _recipe:
        _recipe.setdefault("rotation", "none")


def _reorder_only(pattern: str) -> None:
    """Patch the module pruner so only modules whose name matches ``pattern`` are reordered."""
    import dataclasses
    import re

    from rose_hf import pruning

    call = pruning.ModulePruner.__call__

    def patched(self, name, module, H, C=None):  # type: ignore[no-untyped-def]
        config = self.config
        self.config = dataclasses.replace(config, reorder=config.reorder if re.search(pattern, name) else "never")
        try:
            return call(self, name, module, H, C)
        finally:
            self.config = config

    pruning.ModulePruner.__call__ = patched


def _fold_only() -> None:
    """Patch the residual rotation to learn nothing and merge ``R = I``: the norms are folded into
    the Linears that read them and made plain, the basis stays (experiment only)."""
    from rose_hf import residual

    def identity(groups, device=None, **kwargs):  # type: ignore[no-untyped-def]
        hidden = groups[0][1].shape[0]
        return torch.eye(hidden, device=device), [0.0, 0.0]

    residual.learn_residual_rotation = identity


def _skip_first_token() -> None:
    """Patch the block loop so the collector leaves position 0 of every window out (experiment only)."""
    from rose_hf import pipeline

    capture = pipeline._BlockLoop._capture

    def patched(self, run, batches, *args, **kwargs):  # type: ignore[no-untyped-def]
        capture(self, run, batches, *args, **kwargs)
        masks = []
        for batch, mask in zip(batches, run.masks):
            real = torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.to(torch.bool)
            real = real.clone()
            real[:, 0] = False
            masks.append(real)
        run.masks = masks

    pipeline._BlockLoop._capture = patched


def _tokens(model: str, path: Path, text: str) -> torch.Tensor:
    cache = ROOT / ".cache" / "tokens" / f"{model}-{text}.pt"
    if cache.is_file():
        return torch.load(cache)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor(tokenizer(read_text(text), add_special_tokens=False).input_ids, dtype=torch.long)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ids, cache)
    return ids


def calibration_windows(model_name: str, path: Path, nsamples: int, seed: int) -> torch.Tensor:
    """The recipes' calibration: ``nsamples`` windows of 512 tokens of WikiText-2 valid, each
    starting with the model's BOS token where it has one (as the evaluation windows do)."""
    from transformers import AutoTokenizer

    from rose_hf.data import sample_windows
    from rose_hf.eval import bos_token_for

    calib = sample_windows(_tokens(model_name, path, "wikitext2-valid"), nsamples, 512, seed=seed)
    bos = bos_token_for(AutoTokenizer.from_pretrained(path))
    if bos is not None:
        calib[:, 0] = bos
    return calib


def _code_version() -> str:
    """The commit the run measured, with ``+dirty`` when src/ had uncommitted changes."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src"], cwd=ROOT).returncode != 0
    return head.stdout.strip() + ("+dirty" if dirty else "")


def run_one(model_name: str, label: str, amount: str, seed: int, threads: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rose_hf import RoseConfig, RosePruner
    from rose_hf.eval import bos_token_for, perplexity, perplexity_windows

    torch.set_num_threads(threads)
    path = prepare(model_name)
    bos = bos_token_for(AutoTokenizer.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    result: dict = {"model": model_name, "label": label, "amount": amount, "seed": seed, "threads": threads}
    result["code"] = _code_version()
    if label != "dense":
        where = {"pattern": amount} if ":" in amount else {"sparsity": float(amount)}
        recipe = dict(LABELS[label])
        if recipe.pop("_skip_first", False):
            _skip_first_token()
        if "_reorder_only" in recipe:
            _reorder_only(recipe.pop("_reorder_only"))
        if recipe.pop("_fold_only", False):
            _fold_only()
        config = RoseConfig(**where, seed=seed, **recipe)
        calib = calibration_windows(model_name, path, 32, seed)
        started = time.perf_counter()
        report = RosePruner(model, config).prune(calib, progress=False)
        result["prune_seconds"] = time.perf_counter() - started
        result["sparsity"] = report.overall_sparsity
        result["modules"] = [[m.name, m.relative_error, m.reordered] for m in report.modules]
        if report.rotation_losses or report.permutation_costs:
            result["rotate_seconds"] = report.rotate_seconds
            result["rotation_losses"] = report.rotation_losses
            result["permutation_costs"] = report.permutation_costs
    for domain, text in DOMAINS.items():
        windows = perplexity_windows(_tokens(model_name, path, text), 512, bos)[:40]
        result[f"ppl_{domain}"] = perplexity(model, windows)
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def out_path(model: str, label: str, amount: str, seed: int) -> Path:
    return RESULTS / f"{model}_{label}_{amount.replace(':', 'of')}_seed{seed}.json"


def run_all(args: argparse.Namespace) -> None:
    runs = [(model, "dense", "0", 0) for model in args.models.split(",")]
    for seed in (int(s) for s in args.seeds.split(",")):
        for amount in args.amounts.split(","):
            for model in args.models.split(","):
                runs += [(model, label, amount, seed) for label in args.labels.split(",")]
    part, parts = (int(x) for x in args.shard.split("/"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for model, label, amount, seed in runs[part::parts]:
        out = out_path(model, label, amount, seed)
        if out.is_file():
            continue
        argv = ["run", "--model", model, "--label", label, "--amount", amount, "--seed", str(seed)]
        started = time.time()
        subprocess.run(
            [sys.executable, __file__, *argv, "--threads", str(args.threads), "--out", str(out)], check=True, env=env
        )
        done = json.loads(out.read_text())
        print(
            f"{out.stem}: {done['ppl_wikitext2']:.2f} / {done['ppl_shakespeare']:.2f} ({time.time() - started:.0f}s)",
            flush=True,
        )


def _load() -> dict[tuple[str, str, str], list[dict]]:
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for file in sorted(RESULTS.glob("*.json")):
        run = json.loads(file.read_text())
        groups.setdefault((run["model"], run["label"], run["amount"]), []).append(run)
    return groups


def _cell(runs: list[dict], key: str) -> str:
    values = [r[key] for r in runs]
    if len(values) == 1:
        return f"{values[0]:.1f} (1 seed)"
    return f"{statistics.mean(values):.1f} ± {(max(values) - min(values)) / 2:.1f}"


def report() -> None:
    import layer_domains  # here: it imports this module's _tokens

    groups = _load()
    lines = [
        "# Recipes on two models and two domains",
        "",
        "Generated by `python benchmarks/recipes.py report` from `benchmarks/results/recipes/` (runs made by",
        "`python benchmarks/recipes.py all ...`). Calibration: WikiText-2 valid, 32 × 512 tokens per seed;",
        "perplexity on the first 40 × 512-token windows of WikiText-2 test (the calibration's domain) and of",
        "tiny-shakespeare (another domain), BOS first where the tokenizer puts it first (Gemma). Cells are",
        "mean ± half the range over the calibration seeds run; time is `prune()` wall time on this shared",
        "2-core CPU (one thread per run, two runs side by side), so compare times within one table only.",
        f"`RoseConfig(sparsity=s)` alone is `{DEFAULT}` on these models (the paper's gate, ADMM, head rotations);",
        "`rose` reorders every module. Every label sets `rotation` (`none` unless named), so each keeps meaning",
        "what it ran after the default rotation changed (issue #14).",
        "",
        "| label | recipe (RoseConfig fields; `_` keys are experiments patched in by recipes.py) |",
        "|---|---|",
        *(f"| {label} | `{recipe}` |" for label, recipe in LABELS.items() if label != "dense"),
        "",
        "## The default against its parts",
        "",
        "![perplexity against amount, both models and texts](img/recipes.png)",
        "",
        f"`{DEFAULT}` is `RoseConfig(sparsity=s)` alone. A verdict needs the gap of the means over the",
        "calibration seeds to exceed the larger half range; the percentage is the gap relative to the other.",
        "Where either side ran one seed, the cell gives the gap with no verdict.",
        "",
        *verdicts(groups),
        "",
    ]
    for model in MODELS:
        amounts = sorted({a for (m, _, a) in groups if m == model and a != "0"})
        dense = groups.get((model, "dense", "0"))
        if not amounts:
            continue
        lines += ["", f"## {model}"]
        if dense:
            lines.append("")
            lines.append(
                f"Dense: WikiText-2 {dense[0]['ppl_wikitext2']:.1f}, tiny-shakespeare {dense[0]['ppl_shakespeare']:.1f}."
            )
        for amount in amounts:
            lines += [
                "",
                f"### {amount}",
                "",
                "| recipe | seeds | WikiText-2 test | tiny-shakespeare | prune s | peak MiB |",
            ]
            lines.append("|---|---|---|---|---|---|")
            for label in LABELS:
                runs = groups.get((model, label, amount))
                if not runs:
                    continue
                seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
                lines.append(
                    f"| {label} | {seeds} | {_cell(runs, 'ppl_wikitext2')} | {_cell(runs, 'ppl_shakespeare')} | "
                    f"{statistics.mean(r['prune_seconds'] for r in runs):.0f} | "
                    f"{max(r['peak_rss_mib'] for r in runs):.0f} |"
                )
    plot(groups)
    lines += rounding(groups)
    lines += _per_module(groups)
    lines += [
        "",
        "## Per layer: calibration text, held-out text, another domain",
        "",
        "Generated by `python benchmarks/layer_domains.py run --model <m> --seed 0`: each module of six blocks of",
        "the *dense* model, pruned from its calibration Hessian by each variant; every cell is the mean over",
        "modules of the variant's relative layer error divided by SparseGPT's, measured on the calibration",
        "windows themselves, on WikiText-2 test and on tiny-shakespeare (16 × 512 tokens each). Below 1 is",
        "better than SparseGPT.",
        *layer_domains.summary(),
    ]
    DOC.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(DOC.read_text())


ROUNDING = ROOT / "benchmarks" / "results" / "rounding"


def rounding(groups: dict[tuple[str, str, str], list[dict]]) -> list[str]:
    """The same recipe and seeds on two commits whose arithmetic differs only in rounding: the older
    runs kept in ``benchmarks/results/rounding/`` (``<model>_<label>_<amount>_seed<s>_<commit>.json``)
    against the current ones; how far rounding alone moves a figure."""
    older: dict[tuple[str, str, str], list[dict]] = {}
    for file in sorted(ROUNDING.glob("*.json")):
        run = json.loads(file.read_text())
        older.setdefault((run["model"], run["label"], run["amount"]), []).append(run)
    if not older:
        return []
    lines = [
        "",
        "## Rounding alone",
        "",
        "The same recipe and seeds on an older commit whose arithmetic differs from the current one only in",
        "rounding (the head rotation and channel permutation read the step's Hessians turned with the weights,",
        "`Qᵀ H Q`, instead of measuring them again in the new basis: equal to fp32 rounding, tests/test_pipeline.py).",
        "Per seed, WikiText-2 test / tiny-shakespeare:",
        "",
        "| model | label | amount | seed | older commit | older | current | current commit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, runs in sorted(older.items()):
        now = {r["seed"]: r for r in groups.get(key, []) if r["seed"] in {o["seed"] for o in runs}}
        for run in sorted(runs, key=lambda r: r["seed"]):
            new = now.get(run["seed"])
            if new is None:
                continue
            lines.append(
                f"| {key[0]} | {key[1]} | {key[2]} | {run['seed']} | {run['code']} | "
                f"{run['ppl_wikitext2']:.2f} / {run['ppl_shakespeare']:.1f} | "
                f"{new['ppl_wikitext2']:.2f} / {new['ppl_shakespeare']:.1f} | {new['code']} |"
            )
        if len(now) < 2:
            continue
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | mean ± half range | | {_cell(runs, 'ppl_wikitext2')} / "
            f"{_cell(runs, 'ppl_shakespeare')} | {_cell(list(now.values()), 'ppl_wikitext2')} / "
            f"{_cell(list(now.values()), 'ppl_shakespeare')} | |"
        )
    return lines


DEFAULT = "rose-auto-admm-heads"  # what RoseConfig(sparsity=s) runs on a model with v_proj/o_proj (since #14)
PARTS = {
    "sparsegpt": "SparseGPT",
    "rose-auto": "ROSE alone (gate, no refinement)",
    "sparsegpt-admm": "ADMM alone",
    "rose-auto-admm": "no rotation (the default before #14)",
}


def _verdict(a: list[float], b: list[float]) -> str:
    """A against B over seeds: a claim needs the gap of the means to exceed the larger half-range."""
    gap = statistics.mean(a) - statistics.mean(b)
    noise = max((max(v) - min(v)) / 2 for v in (a, b))
    word = "within noise" if abs(gap) <= noise else ("better" if gap < 0 else "worse")
    return f"{word} ({gap / statistics.mean(b):+.0%})"


def _cell_verdict(a: list[float], b: list[float]) -> str:
    """``_verdict`` where both sides have a spread; with one seed on either side only the gap, said so."""
    if not a or not b:
        return "—"
    if len(a) > 1 and len(b) > 1:
        return _verdict(a, b)
    gap = statistics.mean(a) - statistics.mean(b)
    return f"{'lower' if gap < 0 else 'higher'} ({gap / statistics.mean(b):+.0%}), one seed: no spread"


def verdicts(groups: dict[tuple[str, str, str], list[dict]] | None = None) -> list[str]:
    """Markdown: the default against each of its parts, per model, amount and domain (3 seeds)."""
    groups = groups if groups is not None else _load()
    lines = [
        "| model | amount | text | default (mean ± half range) | "
        + " | ".join(f"vs {name}" for name in PARTS.values())
        + " | default's share of SparseGPT's gap to dense closed |",
        "|---|---|---|---|" + "---|" * (len(PARTS) + 1),
    ]
    for model in MODELS:
        dense = groups.get((model, "dense", "0"))
        for amount in sorted({a for (m, label, a) in groups if m == model and label == DEFAULT}):
            default = groups[(model, DEFAULT, amount)]
            for domain in DOMAINS:
                key = f"ppl_{domain}"
                mine = [r[key] for r in default]
                cells = []
                for part in PARTS:
                    runs = groups.get((model, part, amount), [])
                    cells.append(_cell_verdict(mine, [r[key] for r in runs]))
                sparsegpt = [r[key] for r in groups.get((model, "sparsegpt", amount), [])]
                closed = "—"
                if dense and sparsegpt:
                    gap = statistics.mean(sparsegpt) - dense[0][key]
                    closed = f"{(statistics.mean(sparsegpt) - statistics.mean(mine)) / gap:.0%}"
                lines.append(
                    f"| {model} | {amount} | {'WikiText-2 test' if domain == 'wikitext2' else 'tiny-shakespeare'} | "
                    f"{_cell(default, key)} | " + " | ".join(cells) + f" | {closed} |"
                )
    return lines


# Issue #14's grid: per method, the transforms before pruning (label suffix -> what it runs).
TRANSFORMS = {
    "": "none",
    "-heads": "`heads`",
    "-perm": "`channel_permutation`",
    "-heads-perm": "`heads` + `channel_permutation`",
    "-heads-perm-400": "`heads` + `channel_permutation`, `rotation_steps=400`",
    "-heads-dropped": '`heads`, `rotation_objective="dropped"`',
    "-residual": "`residual`",
    "-residual-dropped": '`residual`, `rotation_objective="dropped"`',
    "-residual-foldonly": "`residual`'s norm folding alone (`R = I`, an experiment)",
    "-layer": "`layer` (not saved)",
}
METHODS = {"rose-auto-admm": "ROSE + ADMM", "sparsegpt": "SparseGPT"}  # + "-heads": the default
REFUSED = {
    ("gemma3", "-residual"): "refused: Gemma 3's sandwich norms scale each block's output (tests/test_residual.py)",
}


def rotations(groups: dict[tuple[str, str, str], list[dict]] | None = None) -> list[str]:
    """Markdown: every method x transform run, per model, amount and domain, against no transform."""
    groups = groups if groups is not None else _load()
    lines = [
        "| model | amount | method | transform | seeds | WikiText-2 test | vs none | tiny-shakespeare | vs none |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        amounts = sorted({a for (m, label, a) in groups if m == model}, key=lambda a: (a == "2:4", a))
        for amount in amounts:
            for method, method_name in METHODS.items():
                base = groups.get((model, method, amount), [])
                for suffix, transform in TRANSFORMS.items():
                    runs = groups.get((model, method + suffix, amount), [])
                    if not suffix and not any(groups.get((model, method + t, amount)) for t in TRANSFORMS if t):
                        break  # no transform ran here: nothing to compare
                    if not runs:
                        refused = REFUSED.get((model, suffix))
                        if refused and method == "rose-auto-admm":
                            lines.append(f"| {model} | {amount} | {method_name} | {transform} | — | {refused} | | | |")
                        continue
                    seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
                    cells = []
                    for domain in DOMAINS:
                        key = f"ppl_{domain}"
                        vs = "—" if not suffix else _cell_verdict([r[key] for r in runs], [r[key] for r in base])
                        cells += [_cell(runs, key), vs]
                    lines.append(
                        f"| {model} | {amount} | {method_name} | {transform} | {seeds} | " + " | ".join(cells) + " |"
                    )
    return lines


# The protocol's grid (#14): every method x rotation that applies, at these amounts, three seeds.
GRID_AMOUNTS = ("0.5", "0.7", "2:4")
GRID_ROTATIONS = ("", "-heads", "-residual", "-layer")


def grid_gaps(groups: dict[tuple[str, str, str], list[dict]] | None = None) -> list[str]:
    """Markdown bullets: the grid's cells with fewer than three seeds (refused cells left out)."""
    groups = groups if groups is not None else _load()
    gaps = []
    for model in MODELS:
        for amount in GRID_AMOUNTS:
            for method, method_name in METHODS.items():
                for suffix in GRID_ROTATIONS:
                    if (model, suffix) in REFUSED:
                        continue
                    seeds = sorted(r["seed"] for r in groups.get((model, method + suffix, amount), []))
                    if len(seeds) < 3:
                        ran = "seeds run: " + ",".join(map(str, seeds)) if seeds else "not run"
                        gaps.append(f"- {model} {amount} {method_name} {TRANSFORMS[suffix]}: {ran}")
    return gaps or ["- none: every cell has three seeds"]


IMG = ROOT / "docs" / "img" / "recipes.png"
AMOUNT_ORDER = ("0.5", "0.6", "0.7", "0.8", "2:4")


def plot(groups: dict[tuple[str, str, str], list[dict]]) -> None:
    """docs/img/recipes.png: perplexity against amount, one panel per model and text, per label
    run at more than one amount (mean over seeds, bars the half range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for row, model in enumerate(MODELS):
        dense = groups.get((model, "dense", "0"))
        for col, domain in enumerate(DOMAINS):
            ax, key = axes[row][col], f"ppl_{domain}"
            for label in (DEFAULT, *PARTS):
                points = [
                    (i, groups[(model, label, a)]) for i, a in enumerate(AMOUNT_ORDER) if (model, label, a) in groups
                ]
                if len(points) < 2:
                    continue
                name = "default (gate + ADMM + heads)" if label == DEFAULT else PARTS[label]
                color = None
                for pattern in (False, True):  # a line through the unstructured amounts; 2:4 stands apart
                    part = [(i, runs) for i, runs in points if (AMOUNT_ORDER[i] == "2:4") == pattern]
                    if not part:
                        continue
                    drawn = ax.errorbar(
                        [i for i, _ in part],
                        [statistics.mean(r[key] for r in runs) for _, runs in part],
                        yerr=[(max(r[key] for r in runs) - min(r[key] for r in runs)) / 2 for _, runs in part],
                        marker="s" if pattern else "o",
                        capsize=3,
                        color=color,
                        linestyle="none" if pattern else "-",
                        label=None if color else name,
                    )
                    color = drawn.lines[0].get_color()
            if dense:
                ax.axhline(dense[0][key], color="grey", linestyle=":", label="dense")
            ax.set_yscale("log")
            ax.set_xticks(range(len(AMOUNT_ORDER)), AMOUNT_ORDER)
            text = "WikiText-2 test" if domain == "wikitext2" else "tiny-shakespeare"
            ax.set_title(f"{model}: {text}", fontsize=10)
            ax.set_xlabel("sparsity (unstructured) or pattern")
            ax.set_ylabel("perplexity (log)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    IMG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG, dpi=110)
    plt.close(fig)


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _per_module(groups: dict[tuple[str, str, str], list[dict]]) -> list[str]:
    """Per module kind: mean relative layer error of each recipe, and how often each reordered."""
    lines = [
        "",
        "## Per module kind",
        "",
        "Mean relative layer error (`ModuleReport.relative_error`, on the calibration tokens) over every",
        "block and seed, and in brackets the share of modules pruned in ROSE's order. Each recipe's later",
        "blocks see inputs its own earlier blocks produced, so compare within a row.",
    ]
    for (model, label, amount), runs in sorted(groups.items()):
        if label != "sparsegpt":
            continue
        recipes = [r for r in LABELS if (model, r, amount) in groups and r != "dense"]
        kinds = sorted({_kind(m[0]) for run in runs for m in run["modules"]})
        lines += ["", f"### {model} {amount}", "", "| module | " + " | ".join(recipes) + " |"]
        lines.append("|---|" + "---|" * len(recipes))
        for kind in kinds:
            cells = []
            for recipe in recipes:
                rows = [m for run in groups[(model, recipe, amount)] for m in run["modules"] if _kind(m[0]) == kind]
                error = statistics.mean(m[1] for m in rows)
                reordered = sum(bool(m[2]) for m in rows) / len(rows)
                cells.append(f"{error:.4f} ({reordered:.0%})")
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run")
    one.add_argument("--model", choices=MODELS, required=True)
    one.add_argument("--label", choices=sorted(LABELS), required=True)
    one.add_argument("--amount", default="0.7")
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--out", type=Path)
    every = sub.add_parser("all")
    every.add_argument("--models", default=",".join(MODELS))
    every.add_argument("--labels", default="sparsegpt,rose,rose-best,sparsegpt-refit,rose-best-refit")
    every.add_argument("--amounts", default="0.7")
    every.add_argument("--seeds", default="0,1,2")
    every.add_argument("--shard", default="0/1")
    for p in (one, every):
        p.add_argument("--threads", type=int, default=1)
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "run":
        text = json.dumps(run_one(args.model, args.label, args.amount, args.seed, args.threads), indent=1)
        if args.out:
            args.out.write_text(text)
        else:
            print(text)
    elif args.command == "all":
        run_all(args)
    else:
        report()


if __name__ == "__main__":
    main()
