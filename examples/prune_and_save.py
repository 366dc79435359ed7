"""Prune a causal LM to 60 % with ROSE and save it with provenance and a model card.

python examples/prune_and_save.py --model HuggingFaceTB/SmolLM2-135M --calib calibration.txt --output smol-rose-60
"""

from __future__ import annotations

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer

from rose_hf import RoseConfig, RosePruner
from rose_hf.data import calibration_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", default="c4", help="c4 | wikitext2 | a .txt/.jsonl file")
    parser.add_argument("--output", required=True)
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    calib = calibration_batches(tokenizer, args.calib, args.nsamples, args.seqlen, seed=0)

    pruner = RosePruner(model, RoseConfig(sparsity=args.sparsity))
    report = pruner.prune(calib)
    print(report.summary())
    for module in sorted(report.modules, key=lambda m: -m.relative_error)[:5]:
        print(f"  hardest: {module.name} relative error {module.relative_error:.4f} reordered={module.reordered}")
    pruner.save_pretrained(args.output, tokenizer=tokenizer, calibration_source=args.calib)


if __name__ == "__main__":
    main()
