"""rose_hf against llm-compressor's SparseGPT on one run: time, peak memory, perplexity.

    python benchmarks/peer.py --setup   # once: the peer virtualenv (.cache/llmc-venv)
    python benchmarks/peer.py           # benchmarks/results/peer.json, then speed.py --render

Every contender is its own process on the same fp32 SmolLM2-135M folder, the same calibration
windows (saved to a file and handed over) and the same thread count:

- ``forward``: one plain forward pass of the calibration set (the floor pruning is measured against);
- ``default``: ROSE's gate, then ADMM (rose_hf's default recipe before issue #14 added the head
  rotations; every row here pins ``rotation="none"``, as the stored results ran);
- ``rose`` and ``sparsegpt``: rose_hf's ``RosePruner`` in memory without a refinement step (like for
  like with llm-compressor's SparseGPT); ``rose-sequential`` the same with ``true_sequential=True``
  (one forward per block);
- ``llmcompressor``: ``oneshot`` with ``SparseGPTModifier`` (same sparsity, block size 128,
  dampening 0.01, every ``Linear`` but the head) in its own virtualenv, since it pins transformers.

Times are the pruning call only (model loading excluded for both); peak memory is each process's
peak RSS. The pruned decoder blocks come back as safetensors files and this process scores all of
them with rose_hf's perplexity code on the same evaluation windows.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import tokens
from smollm2 import ROOT, peak_rss_mib, prepare
from speed import forward_seconds

OUT = ROOT / "benchmarks" / "results" / "peer.json"
WORK = ROOT / ".cache" / "peer"
VENV = ROOT / ".cache" / "llmc-venv"
PEER_PIN = "llmcompressor==0.14.0.1"


def setup() -> None:
    """Create the peer virtualenv: the local CPU torch wheel first, then llm-compressor."""
    if not (VENV / "bin" / "python").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, PEER_PIN], check=True)


def block_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().contiguous() for n, t in model.state_dict().items() if ".layers." in n}


def measure(what: str, args: argparse.Namespace) -> dict:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from rose_hf import RoseConfig, RosePruner

    torch.set_num_threads(args.threads)
    ids = torch.load(WORK / "calib.pt")
    model = AutoModelForCausalLM.from_pretrained(prepare(), dtype=torch.float32)
    if what == "forward":
        return {"seconds": forward_seconds(model, ids)}
    start = time.perf_counter()
    if what == "default":
        config = RoseConfig(sparsity=args.sparsity, rotation="none")
    else:
        config = RoseConfig(
            sparsity=args.sparsity,
            method=what.removesuffix("-sequential"),
            true_sequential=what.endswith("-sequential"),
            refine="none",
            rotation="none",
        )
    report = RosePruner(model, config).prune(ids, progress=False)
    seconds = time.perf_counter() - start
    save_file(block_weights(model), str(WORK / f"{what}.safetensors"))
    return {
        "seconds": seconds,
        "peak_rss_mib": peak_rss_mib(),
        "reordered": report.reordered_count,
        **{key: getattr(report, key) for key in ("calibrate_seconds", "prune_seconds", "propagate_seconds")},
    }


def child(what: str, args: argparse.Namespace) -> dict:
    common = ["--sparsity", str(args.sparsity), "--threads", str(args.threads)]
    if what == "llmcompressor":
        if not (VENV / "bin" / "python").is_file():
            raise SystemExit(f"no peer virtualenv at {VENV}; run `python benchmarks/peer.py --setup` first.")
        script = Path(__file__).with_name("peer_llmcompressor.py")
        argv = [str(VENV / "bin" / "python"), str(script), str(prepare()), str(WORK / "calib.pt")]
        argv += [str(WORK / "llmcompressor.safetensors"), *common]
    else:
        argv = [sys.executable, __file__, "--child", what, *common]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def score(names: list[str], args: argparse.Namespace) -> dict[str, float]:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rose_hf.eval import perplexity, perplexity_windows, sparsity_census

    torch.set_num_threads(args.threads)
    evaluation = perplexity_windows(tokens(args.eval), args.seqlen)[: args.eval_windows]
    model = AutoModelForCausalLM.from_pretrained(prepare(), dtype=torch.float32)
    dense = block_weights(model)
    results = {"dense": perplexity(model, evaluation)}
    for name in names:
        model.load_state_dict(load_file(str(WORK / f"{name}.safetensors")), strict=False)
        results[name] = perplexity(model, evaluation)
        results[f"{name}_sparsity"] = sparsity_census(model)["overall_sparsity"]
        model.load_state_dict(dense, strict=False)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help="create the peer virtualenv and exit")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", default="wikitext2-valid")
    parser.add_argument("--eval", default="wikitext2-test")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.setup:
        setup()
        return
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    from rose_hf.data import sample_windows

    WORK.mkdir(parents=True, exist_ok=True)
    prepare()
    torch.save(sample_windows(tokens(args.calib), args.nsamples, args.seqlen, seed=args.seed), WORK / "calib.pt")
    pruners = ("default", "rose", "rose-sequential", "sparsegpt", "llmcompressor")
    runs = {what: child(what, args) for what in ("forward", *pruners)}
    ppl = score(list(pruners), args)
    for name in pruners:
        runs[name]["ppl"] = ppl[name]
        runs[name]["sparsity"] = ppl[f"{name}_sparsity"]
    result = {
        "setup": {
            "sparsity": args.sparsity,
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "seed": args.seed,
            "calib": args.calib,
            "eval": args.eval,
            "eval_windows": args.eval_windows,
            "threads": args.threads,
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
        "dense_ppl": ppl["dense"],
        **runs,
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
