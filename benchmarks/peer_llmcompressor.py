"""llm-compressor's SparseGPTModifier on the calibration windows that ``peer.py`` hands over.

Runs inside the peer virtualenv (llm-compressor pins its own transformers), never imports rose_hf:

    .cache/llmc-venv/bin/python benchmarks/peer_llmcompressor.py MODEL CALIB.pt OUT.safetensors

Prints one JSON line: the wall time of ``oneshot``, the process's peak RSS, versions. The pruned
state dict goes to OUT so ``peer.py`` scores it with the same perplexity code as rose_hf's runs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def vmhwm_mib() -> float:
    """Peak resident set (VmHWM) in MiB; ru_maxrss would include the parent's at the fork."""
    with open("/proc/self/status", encoding="ascii") as handle:
        return next(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmHWM:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("calib", help="a .pt file holding a (samples, seqlen) tensor of token ids")
    parser.add_argument("out")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    ids = torch.load(args.calib)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    recipe = SparseGPTModifier(
        sparsity=args.sparsity, block_size=128, dampening_frac=0.01, targets=["Linear"], ignore=["re:.*lm_head"]
    )
    start = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=data,
        recipe=recipe,
        num_calibration_samples=int(ids.shape[0]),
        max_seq_length=int(ids.shape[1]),
        shuffle_calibration_samples=False,
        pipeline="sequential",
    )
    seconds = time.perf_counter() - start
    # The decoder blocks are all that pruning touches (the tied embeddings cannot be saved twice).
    state = {n: t.detach().to(torch.float32).contiguous() for n, t in model.state_dict().items() if ".layers." in n}
    save_file(state, args.out)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_mib": vmhwm_mib(),
                "llmcompressor": llmcompressor.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
