"""Compare a dense model and its pruned copy on perplexity, and check the pruned checkpoint's sparsity.

python examples/evaluate.py --dense HuggingFaceTB/SmolLM2-135M --pruned smol-rose-60 --text test.txt
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rose_hf.eval import inspect_checkpoint, perplexity, perplexity_windows
from rose_hf.sources import load_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", required=True)
    parser.add_argument("--pruned", required=True, help="a local pruned folder")
    parser.add_argument("--text", default="wikitext2", help="wikitext2 | c4 | a .txt/.jsonl file")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=40)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.dense)
    text = load_text(args.text, "test" if args.text == "wikitext2" else None)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    windows = perplexity_windows(ids, args.seqlen)[: args.windows]
    for name in (args.dense, args.pruned):
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        print(f"{name}: perplexity {perplexity(model, windows):.3f}")
    print(f"sparsity of {args.pruned}: {inspect_checkpoint(args.pruned)['overall_sparsity']:.4f}")


if __name__ == "__main__":
    main()
