"""Prune to the 2:4 pattern (sparse tensor cores) and push the result to the Hub.

    HF_TOKEN=... python examples/prune_2_4_and_push.py --model meta-llama/Llama-3.2-1B --repo me/llama-1b-rose-2of4

Running it again with the same model revision, recipe and calibration uploads nothing.
"""

from __future__ import annotations

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer

from rose_hf import RoseConfig, RosePruner
from rose_hf.data import calibration_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--repo", required=True, help="Hub repository to push to")
    parser.add_argument("--calib", default="c4")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    calib = calibration_batches(tokenizer, args.calib, args.nsamples, args.seqlen, seed=0)
    pruner = RosePruner(model, RoseConfig(pattern="2:4"))
    print(pruner.prune(calib).summary())
    result = pruner.push_to_hub(
        args.repo, private=args.private, endpoint=args.endpoint, tokenizer=tokenizer, calibration_source=args.calib
    )
    print(("already up to date: " if result.skipped else "pushed: ") + result.repo_url)


if __name__ == "__main__":
    main()
