"""Memory arithmetic for docs/scaling.md: what pruning a model of a given shape needs, per mode.

    python benchmarks/memory_arithmetic.py            # prints the markdown table

Shapes are those of the public configs (Llama-2-7B, Llama-2-70B, Llama-3.1-405B); weights bf16,
Hessians and the SparseGPT working copies fp32, calibration 128 x 2048 tokens, as the papers use.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def block_params(self) -> int:
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_dim
        return attention + 3 * self.hidden * self.intermediate

    def outside_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)


MODELS = [
    Shape("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000),
    Shape("Llama-2-70B", 8192, 28672, 80, 64, 8, 32000),
    Shape("Llama-3.1-405B", 16384, 53248, 126, 128, 8, 128256),
]


def budget(shape: Shape, nsamples: int = 128, seqlen: int = 2048) -> dict[str, float]:
    weights = (shape.block_params() * shape.layers + shape.outside_params()) * 2
    block = shape.block_params() * 2
    # The hidden states of every calibration sequence, in the model dtype; propagation replaces them
    # in place, so one set is alive. With activations on disk only one sequence (in and out) is.
    activations = nsamples * seqlen * shape.hidden * 2
    one_sequence = 2 * seqlen * shape.hidden * 2
    # Distinct module inputs per block: attention input, o_proj input, MLP input, down_proj input.
    hessians = (3 * shape.hidden**2 + shape.intermediate**2) * 4
    # The largest module being pruned: its fp32 weight copy and two (cols, cols) matrices while the
    # inverse Hessian is factored; then the default's ADMM step (refine="admm", rose_hf.admm): five
    # (rows, cols) fp32 buffers and two (cols, cols) ones (the factor is re-made in place).
    sparsegpt_working = (shape.hidden * shape.intermediate + 2 * shape.intermediate**2) * 4
    admm_working = (5 * shape.hidden * shape.intermediate + 2 * shape.intermediate**2) * 4
    working = max(sparsegpt_working, admm_working)
    # true_sequential: every sequence's forward is paused at once; at the down projection each token
    # holds at least the residual stream, the MLP input and the MLP's inner product (a lower bound:
    # other pauses and the allocator add to it, docs/performance.md measures it), on top of the inputs.
    paused = nsamples * seqlen * (2 * shape.hidden + shape.intermediate) * 2
    # rotation="residual": its learning holds on the host a copy of every block's q/k/v and gate/up
    # weights (bf16) and two fp32 hidden x hidden inverse Hessians per block (rose_hf.residual).
    readers = (shape.hidden + 2 * shape.kv_dim + 2 * shape.intermediate) * shape.hidden * 2
    residual = shape.layers * (readers + 2 * shape.hidden**2 * 4)
    # Streaming reads only the embedding rows of the calibration tokens: at most the whole matrix.
    embedding_rows = min(shape.vocab, nsamples * seqlen) * shape.hidden * 2
    return {
        "weights": weights / GIB,
        "device_memory": (block + activations + hessians + working) / GIB,
        "device_disk": (block + one_sequence + hessians + working) / GIB,
        "device_sequential": (block + activations + paused + hessians + working) / GIB,
        "memory_ram": weights / GIB,
        "stream_ram": (embedding_rows + block) / GIB,
        "activations": activations / GIB,
        "admm_extra": (admm_working - sparsegpt_working) / GIB,
        "residual_ram": residual / GIB,
    }


def table() -> str:
    rows = [
        "| model | bf16 weights GiB | compute device GiB, activations in memory | compute device GiB, activations "
        "on disk | compute device GiB, `true_sequential` (at least) | activations GiB (device or disk) | "
        "host RAM, in-memory GiB | host RAM, `--stream` GiB | compute device: ADMM's extra GiB (in the columns before) | "
        'host RAM: `rotation="residual"`\'s extra GiB while it learns |',
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in MODELS:
        b = budget(shape)
        rows.append(
            f"| {shape.name} | {b['weights']:.1f} | {b['device_memory']:.1f} | {b['device_disk']:.1f} | "
            f"{b['device_sequential']:.1f} | "
            f"{b['activations']:.1f} | {b['memory_ram']:.1f} | {b['stream_ram']:.1f} | {b['admm_extra']:.1f} | "
            f"{b['residual_ram']:.1f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
