"""Probe: does folding a norm's weight into its readers change SparseGPT's answer through the dampening?

``rotation="residual"`` first folds each RMSNorm's weight ``g`` into the Linears that read it
(``W ← W diag(g)``, their input ``x ← x / g``). The pruned layer's error ``‖X(W − Ŵ)‖²`` does not
depend on that basis, and SparseGPT's mask and update would not either (the importance
``w² / [H⁻¹]_jj`` and the update are unchanged by scaling a column), but for the dampening
``percdamp · mean(diag H) · I``: after folding ``H`` is ``D⁻¹ H D⁻¹`` and the same rule damps each
column in another proportion. This measures, per reader of the dense model, SparseGPT's layer error
(in the original basis) pruned as is, folded, and folded with the dampening carried over
(``λ D⁻²`` with the unfolded run's ``λ``, which makes the folded problem the unfolded one). Nothing
is built in rose_hf from it.

    python benchmarks/fold_damping_probe.py --model smollm2 [--amount 0.7]

Output: benchmarks/results/fold_damping_probe/<model>_<amount>.json; the run prints the table.
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
from models import prepare
from recipes import calibration_windows
from residual_order_probe import input_hessians
from smollm2 import ROOT

from rose_hf.residual import block_layout, rms_scale
from rose_hf.sparsegpt import sparsegpt_prune

RESULTS = ROOT / "benchmarks" / "results" / "fold_damping_probe"
READERS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
NORMS = {"self_attn": "input_layernorm", "mlp": "post_attention_layernorm"}


def layer_error(W: torch.Tensor, pruned: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)``, relative to ``tr(W H Wᵀ)``."""
    D = (W - pruned).double()
    return float(((D @ H.double()) * D).sum() / ((W.double() @ H.double()) * W.double()).sum())


def variants(W: torch.Tensor, H: torch.Tensor, g: torch.Tensor, sparsity: float, n: int, m: int) -> dict:
    """The reader's relative layer error pruned as is, folded, and folded with the dampening carried over."""
    percdamp = 0.01
    options = {"n": n, "m": m}
    plain = sparsegpt_prune(W, H, sparsity, percdamp=percdamp, **options).weight
    folded_W, folded_H = W * g, H / g[:, None] / g[None, :]
    folded = sparsegpt_prune(folded_W, folded_H, sparsity, percdamp=percdamp, **options).weight / g
    damp = percdamp * float(torch.diagonal(H).mean())
    carried = folded_H + torch.diag(damp / g.square())
    kept = sparsegpt_prune(folded_W, carried, sparsity, percdamp=0.0, **options).weight / g
    return {name: layer_error(W, Wp, H) for name, Wp in (("plain", plain), ("folded", folded), ("carried", kept))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2"])  # Gemma's sandwich norms refuse the fold
    parser.add_argument("--amount", default="0.7", help="a sparsity such as 0.7, or N:M such as 2:4")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    n, m = (int(v) for v in args.amount.split(":")) if ":" in args.amount else (0, 0)
    sparsity = n / m if m else float(args.amount)
    start = time.perf_counter()
    path = prepare(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = calibration_windows(args.model, path, args.nsamples, 0)
    blocks = model.model.layers
    watched = {
        (i, half): getattr(getattr(b, half), names[0]) for i, b in enumerate(blocks) for half, names in READERS.items()
    }
    hessians = input_hessians(model, ids, watched)
    rows: dict[str, dict[str, float]] = {}
    spans: dict[str, list[float]] = {half: [] for half in READERS}  # per block, the norm scale's max / min
    with torch.no_grad():
        for index, block in enumerate(blocks):
            block_layout(block, index)  # refuses a block the residual rotation would refuse
            for half, names in READERS.items():
                g = rms_scale(getattr(block, NORMS[half]), model.config.hidden_size)
                spans[half].append(float(g.abs().max() / g.abs().min()))
                for name in names:
                    W = getattr(getattr(block, half), name).weight.detach().float()
                    rows[f"{index}.{name}"] = variants(W, hessians[(index, half)], g, sparsity, n, m)
    ratios = {
        name: {
            variant: statistics.mean(r[variant] / r["plain"] for key, r in rows.items() if key.endswith(f".{name}"))
            for variant in ("folded", "carried")
        }
        for names in READERS.values()
        for name in names
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.model}_{args.amount.replace(':', 'of')}.json"
    out.write_text(
        json.dumps(
            {"amount": args.amount, "nsamples": args.nsamples, "seconds": time.perf_counter() - start,
             "ratios": ratios, "norm_weight_max_over_min": spans, "modules": rows},
            indent=1,
        )
    )  # fmt: skip
    print(f"{args.model} {args.amount}: layer error over the unfolded one's, mean over blocks")
    print("| reader | folded | folded, dampening carried over |\n|---|---|---|")
    for name, r in ratios.items():
        print(f"| `{name}` | {r['folded']:.3f} | {r['carried']:.3f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
