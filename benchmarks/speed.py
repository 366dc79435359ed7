"""Time and memory of pruning against the floor, on SmolLM2-135M (docs/performance.md).

    python benchmarks/speed.py            # writes benchmarks/results/speed.json and docs/performance.md

- floor: one plain forward pass of the calibration set through the model (no hooks, no pruning);
  pruning needs about two such passes (calibrate + propagate) plus the X^T X products;
- each method's pruning time, split into capture / calibrate / prune / propagate;
- streaming mode: peak RSS of a process that streams the fp32 checkpoint to a pruned copy, against
  an idle interpreter with torch and transformers imported and against the checkpoint size;
- a cProfile of one ROSE run: the top functions by own time.

Each measurement runs in its own process so RSS and caches are its own.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import tokens
from smollm2 import ROOT, prepare

OUT = ROOT / "benchmarks" / "results" / "speed.json"
DOC = ROOT / "docs" / "performance.md"


def calib(args: argparse.Namespace) -> torch.Tensor:
    from rose_hf.data import sample_windows

    return sample_windows(tokens("wikitext2-valid"), args.nsamples, args.seqlen, seed=0)


def measure(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    from rose_hf import RoseConfig, RosePruner

    torch.set_num_threads(args.threads)
    ids = calib(args)
    if args.what == "stream":  # before any model is loaded: the peak RSS must be streaming's own
        from rose_hf.streaming import prune_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            prune_checkpoint(prepare(), Path(tmp) / "out", RoseConfig(sparsity=0.7), ids, progress=False)
            seconds = time.perf_counter() - start
        return {"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    model = AutoModelForCausalLM.from_pretrained(prepare(), dtype=torch.float32)
    if args.what == "forward":
        with torch.no_grad():
            model(ids[:1], use_cache=False)  # warm-up
            start = time.perf_counter()
            for row in ids:
                model(row.unsqueeze(0), use_cache=False)
        return {"seconds": time.perf_counter() - start}
    if args.what == "inner":
        import rose_hf.sparsegpt as sgpt

        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        X = torch.randn(4096, 1536, generator=g)
        H, W = 2 / 4096 * X.T @ X, torch.randn(576, 1536, generator=g)
        timings = {}
        for label, step in (("full", 10**9), ("16", 16)):
            sgpt.INNER_STEP = step
            sgpt.sparsegpt_prune(W, H, 0.7)
            start = time.perf_counter()
            for _ in range(3):
                sgpt.sparsegpt_prune(W, H, 0.7)
            timings[label] = (time.perf_counter() - start) / 3
        return timings
    config = RoseConfig(sparsity=0.7, method=args.what)
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    report = RosePruner(model, config).prune(ids, progress=False)
    result = {
        key: getattr(report, key)
        for key in ("seconds", "capture_seconds", "calibrate_seconds", "prune_seconds", "propagate_seconds")
    }
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if profiler:
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
        result["profile"] = text.getvalue()
    return result


def child(what: str, args: argparse.Namespace, profile: bool = False) -> dict:
    argv = [
        sys.executable,
        __file__,
        "--child",
        what,
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--threads",
        str(args.threads),
    ]
    if profile:
        argv.append("--profile")
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def idle_rss() -> float:
    code = "import resource, torch, transformers, rose_hf; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", dest="what")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--render", action="store_true", help="only rewrite the page from the saved results")
    parser.add_argument("--only", help="re-measure one entry (e.g. stream) into the saved results")
    args = parser.parse_args()
    if args.what:
        print(json.dumps(measure(args)))
        return
    if args.render or args.only:
        results = json.loads(OUT.read_text())
        if args.only:
            results[args.only] = child(args.only, args)
            OUT.write_text(json.dumps(results, indent=1))
        DOC.write_text(render(results))
        return
    prepare()
    checkpoint = sum(f.stat().st_size for f in prepare().glob("*.safetensors")) / 2**20
    results = {
        "setup": {
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "threads": args.threads,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "checkpoint_mib": checkpoint,
        },
        "forward": child("forward", args),
        "sparsegpt": child("sparsegpt", args),
        "rose": child("rose", args, profile=True),
        "wanda": child("wanda", args),
        "stream": child("stream", args),
        "inner_step": child("inner", args),
        "idle_rss_mib": idle_rss(),
    }
    OUT.write_text(json.dumps(results, indent=1))
    DOC.write_text(render(results))
    print(DOC)


def render(r: dict) -> str:
    floor = r["forward"]["seconds"]
    rows = []
    for method in ("sparsegpt", "rose", "wanda"):
        m = r[method]
        rows.append(
            f"| {method} | {m['seconds']:.1f} | {m['capture_seconds']:.1f} | {m['calibrate_seconds']:.1f} | "
            f"{m['prune_seconds']:.1f} | {m['propagate_seconds']:.1f} | {m['seconds'] / floor:.2f} | {m['peak_rss_mib']:.0f} |"
        )
    stream = r["stream"]
    above_idle = stream["peak_rss_mib"] - r["idle_rss_mib"]
    s = r["setup"]
    return PAGE.format(
        nsamples=s["nsamples"],
        seqlen=s["seqlen"],
        threads=s["threads"],
        torch=s["torch"],
        machine=s["machine"],
        floor=floor,
        rows="\n".join(rows),
        rose_over_sgpt=r["rose"]["seconds"] / r["sparsegpt"]["seconds"],
        stream_s=stream["seconds"],
        verdict=(
            "That meets the goal of at most 40 %."
            if above_idle / s["checkpoint_mib"] <= 0.4
            else "That misses the goal of at most 40 %; where the memory goes has not been profiled yet."
        ),
        stream_rss=stream["peak_rss_mib"],
        idle=r["idle_rss_mib"],
        above=above_idle,
        ckpt=s["checkpoint_mib"],
        share=above_idle / s["checkpoint_mib"],
        profile=r["rose"]["profile"].strip(),
        inner_full=r["inner_step"]["full"],
        inner_16=r["inner_step"]["16"],
    )


PAGE = """# Performance

Generated by `python benchmarks/speed.py` (SmolLM2-135M fp32, {nsamples} × {seqlen} calibration tokens,
70 % unstructured, CPU, {threads} threads, torch {torch}, {machine}). Every measurement is its own process.

## Against the floor

One plain forward pass of the calibration set through the model takes **{floor:.1f} s**. Pruning
cannot cost much less than two such passes (calibrate with hooks, propagate the pruned outputs)
plus the `XᵀX` products.

| method | total s | capture | calibrate (forward + XᵀX) | prune (math) | propagate | × forward pass | peak RSS MiB |
|---|---|---|---|---|---|---|---|
{rows}

ROSE's time is **{rose_over_sgpt:.2f}×** SparseGPT's on this run.

## Streaming mode memory

Streaming the {ckpt:.0f} MiB fp32 checkpoint to a pruned copy peaked at {stream_rss:.0f} MiB RSS; an idle interpreter with torch, transformers and rose_hf imported peaks at
{idle:.0f} MiB, so streaming added **{above:.0f} MiB = {share:.0%} of the checkpoint size**.
{verdict}

## Where ROSE's time goes (cProfile, top by own time)

```
{profile}
```

## What was done, in order

1. Profiled first (cProfile): the column-by-column SparseGPT loop was the top Python-level item.
   The loop now does four tensor operations per column instead of ten, and updates only a
   16-column strip one column at a time, with one matmul for the rest of the block (`INNER_STEP`
   in `sparsegpt.py`; the same math, checked against the unblocked reference in the tests). On one
   576 × 1536 matrix (1 thread): {inner_full:.3f} s with the whole block updated per column,
   {inner_16:.3f} s with 16-column strips.
2. Modules that read the same input (q/k/v, gate/up) share one `XᵀX` accumulator (4 products per
   block instead of 7 on Llama-style blocks).
3. Propagation replaces the activations in place, so one set of calibration activations is alive.
4. Streaming mode frees embeddings and head right after capturing the block inputs.
"""


if __name__ == "__main__":
    main()
