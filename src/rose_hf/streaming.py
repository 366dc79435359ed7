"""Prune a checkpoint straight from its safetensors shards to a new checkpoint, one block at a time.

For models larger than memory: the model is built with empty (meta) weights. The small parts
outside the decoder blocks (final norm, position tables) are loaded up front; of the input
embedding matrix only the rows of the calibration tokens are read, and the output head is never
loaded (the pruner never runs it). Each block is read from the shards when its turn comes,
calibrated, pruned and propagated exactly as in memory (the same ``RosePruner`` code), written to
its own output shard, and dropped; the calibration activations wait between blocks in a scratch
file (``activations="disk"``, the default here). Peak memory is about one block plus its working
set, not the model. The tensors outside the blocks are copied to the output byte for byte.

    report = prune_checkpoint("llama-70b/", "llama-70b-rose-50/", RoseConfig(sparsity=0.5), calib)
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rose_hf.config import RoseConfig
from rose_hf.data import unique_ids
from rose_hf.distributed import current_world
from rose_hf.modeling import find_blocks
from rose_hf.pruner import RosePruner, fix_mmap_threshold, release_free_memory
from rose_hf.report import PruneReport
from rose_hf.shards import copy_tensors, read_header, read_rows, torch_dtype

_WEIGHTS_INDEX = "model.safetensors.index.json"
# Files of a model folder that are rewritten here rather than copied.
_REWRITTEN = {"config.json", "README.md", "rose_config.json", _WEIGHTS_INDEX}


class CheckpointReader:
    """Tensor-by-tensor reads from a folder's ``*.safetensors`` (sharded or not).

    Each read opens and closes its shard, so no mapping of a whole shard stays resident.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / _WEIGHTS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        else:
            single = self.folder / "model.safetensors"
            if not single.is_file():
                raise FileNotFoundError(
                    f"no model.safetensors or {_WEIGHTS_INDEX} in {str(folder)!r}; streaming needs safetensors "
                    "(convert .bin checkpoints with save_pretrained first)."
                )
            with safe_open(str(single), framework="pt") as handle:
                self.files = {name: single for name in handle.keys()}

    def entry(self, name: str) -> dict[str, Any]:
        """The safetensors header entry of ``name``: ``dtype``, ``shape``, ``data_offsets``."""
        return dict(read_header(self.files[name])[1][name])

    def names(self) -> list[str]:
        """All tensor names in the checkpoint."""
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, as stored (dtype and layout)."""
        with safe_open(str(self.files[name]), framework="pt") as handle:
            return handle.get_tensor(name)


class StreamingPruner(RosePruner):
    """A ``RosePruner`` whose blocks live on disk until their turn and go back to disk after it."""

    def __init__(self, source: str | Path, config: RoseConfig | None, staging: Path, activations: str = "disk") -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.reader = CheckpointReader(source)
        model_config = AutoConfig.from_pretrained(source)
        dtype = getattr(model_config, "dtype", None) or torch.float32
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
        super().__init__(model, config, activations=activations, scratch_dir=staging)
        self.staging = staging
        self.block_path, self.blocks = find_blocks(model, self.config.block_path)
        self.shards: list[tuple[str, list[str]]] = []
        names = set(self.reader.names())
        expected = {name for name, _ in model.named_parameters()}
        self.embedding_names = self._module_weights(model, model.get_input_embeddings())  # type: ignore[operator]
        # The head never runs here (capture stops at the last block) and is copied to the output as
        # stored, under whatever name the checkpoint uses, so it is neither loaded nor looked for.
        self.head_names = self._module_weights(model, model.get_output_embeddings())  # type: ignore[operator]
        missing = sorted(expected - names - self.head_names - self.embedding_names)
        if missing:
            raise ValueError(
                f"the checkpoint lacks {len(missing)} weights the model needs, e.g. {missing[0]!r}; streaming needs "
                "checkpoint names that match the model's (re-save it with save_pretrained)."
            )
        prefix = f"{self.block_path}."
        for name in sorted(names):
            if not name.startswith(prefix) and name in expected and name not in self.embedding_names | self.head_names:
                self._materialize(model, name, torch.device("cpu"))

    @staticmethod
    def _module_weights(model: nn.Module, module: nn.Module | None) -> set[str]:
        """Full names of ``module``'s own parameters in ``model`` (empty for ``None``)."""
        if module is None:
            return set()
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        return {names[id(p)] for p in module.parameters(recurse=False) if id(p) in names}

    def _before_capture(self, batches: list[dict[str, torch.Tensor]]) -> None:
        # Only the rows of the calibration tokens are read; the other rows are left uninitialised
        # and never read (the lookup touches only these rows). A 128k-token vocabulary then costs a
        # few megabytes here instead of the whole matrix.
        rows = unique_ids(batches)
        stored_heads = sorted(self.head_names & set(self.reader.files))
        for name in sorted(self.embedding_names):
            # A tied matrix may be stored under the head's name only.
            stored = name if name in self.reader.files else next(iter(stored_heads), None)
            if stored is None:
                raise ValueError(f"the checkpoint stores neither {name!r} nor an output head tied to it.")
            entry = self.reader.entry(stored)
            table = torch.empty(entry["shape"], dtype=torch_dtype(entry["dtype"]))
            table[rows] = read_rows(self.reader.files[stored], stored, rows)
            set_module_tensor_to_device(self.model, name, torch.device("cpu"), value=table, dtype=table.dtype)

    def _materialize(self, root: nn.Module, name: str, device: torch.device, prefix: str = "") -> None:
        value = self.reader.get(prefix + name)
        set_module_tensor_to_device(root, name, device, value=value, dtype=value.dtype)

    def _tidy(self) -> None:
        # The forwards of calibration and the pruning of a module leave freed heap pages behind that
        # the next step would only partly reuse; handing them back keeps the peak at what is live.
        release_free_memory()

    def _after_capture(self) -> None:
        # Embeddings, final norm and head are only needed to capture the block inputs; ``finish``
        # copies them from the source checkpoint, so their memory goes back now.
        # ``remove_duplicate=False``: a head tied to the embeddings holds the same tensor and must let
        # go of it too, or nothing is freed.
        prefix = f"{self.block_path}."
        for name, _ in list(self.model.named_parameters(remove_duplicate=False)):
            if not name.startswith(prefix):
                set_module_tensor_to_device(self.model, name, "meta")
        release_free_memory()

    def _enter_block(self, index: int, block: nn.Module) -> None:
        prefix = f"{self.block_path}.{index}."
        for name, _ in list(block.named_parameters()):
            self._materialize(block, name, self.device, prefix)
        block.to(self.device)

    def _leave_block(self, index: int, block: nn.Module) -> None:
        prefix = f"{self.block_path}.{index}."
        tensors = {prefix + name: t.detach().to("cpu").contiguous() for name, t in block.state_dict().items()}
        tensors = {name: t for name, t in tensors.items() if name in self.reader.files}
        self._write_shard(tensors)
        block.to("meta")  # frees the block's memory

    def _write_shard(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.world.rank != 0:  # under torch.distributed every rank has the same weights
            return
        file = f"part-{len(self.shards):05d}.safetensors"
        save_file(tensors, str(self.staging / file), metadata={"format": "pt"})
        self.shards.append((file, sorted(tensors)))

    def finish(self) -> None:
        """Write the tensors outside the blocks and the shard index with transformers' names."""
        prefix = f"{self.block_path}."
        rest = {name: file for name, file in self.reader.files.items() if not name.startswith(prefix)}
        if self.world.rank == 0:
            file = f"part-{len(self.shards):05d}.safetensors"
            copy_tensors(rest, self.staging / file, metadata={"format": "pt"})
            self.shards.append((file, sorted(rest)))
        count = len(self.shards)
        weight_map: dict[str, str] = {}
        total = 0
        for number, (file, names) in enumerate(self.shards, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            (self.staging / file).rename(self.staging / final)
            weight_map.update(dict.fromkeys(names, final))
            total += (self.staging / final).stat().st_size
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.staging / _WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def prune_checkpoint(
    source: str | Path,
    output: str | Path,
    config: RoseConfig,
    calib: Any,
    *,
    base_model: str | None = None,
    calibration: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    repo_id: str | None = None,
    activations: str = "disk",
    mmap_threshold: int | None = None,
) -> PruneReport:
    """Prune the checkpoint folder ``source`` into ``output`` without loading the whole model.

    The output holds the same tensors (bitwise, on CPU) as pruning in memory and saving, one shard
    per decoder block plus one for the rest, the source's config (without compression metadata),
    its tokenizer and generation files, ``rose_config.json`` and a model card. Written all or
    nothing, like ``rose_hf.hub.save_pruned``. ``activations="disk"`` keeps the calibration hidden
    states in a scratch folder inside the output's staging folder between blocks (one batch in
    memory at a time); ``"memory"`` keeps them in memory (faster when they fit). ``mmap_threshold``
    (bytes, e.g. ``1 << 20``) fixes glibc's mmap threshold for the rest of the process so freed
    temporaries leave the resident set at once (``rose_hf.pruner.fix_mmap_threshold``; a
    process-wide setting, so off unless given; the CLI's ``--stream`` passes 1 MiB). Under
    ``torch.distributed`` every rank calls it with the same arguments; calibration is shared out and
    only rank 0 writes.
    """
    from transformers import AutoConfig

    from rose_hf import hub

    source = Path(source)
    if mmap_threshold is not None and not fix_mmap_threshold(mmap_threshold):
        warnings.warn("mmap_threshold is ignored: this C library is not glibc.", stacklevel=2)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{str(source)!r} has no config.json; pass a local checkpoint folder.")
    if current_world().rank != 0:
        # Other ranks compute their share and receive every pruned weight, but only rank 0 writes.
        with tempfile.TemporaryDirectory() as scratch:
            return StreamingPruner(source, config, Path(scratch), activations).prune(calib, progress=False)
    target = Path(output)
    with hub.staged_output(target, overwrite) as staging:
        pruner = StreamingPruner(source, config, staging, activations)
        report = pruner.prune(calib, progress=progress)
        pruner.finish()
        model_config = AutoConfig.from_pretrained(source)
        for key in ("quantization_config", "sparsity_config", "compression_config"):
            if hasattr(model_config, key):
                delattr(model_config, key)
        model_config.save_pretrained(staging)
        for file in source.iterdir():
            if file.is_file() and file.suffix not in (".safetensors", ".bin", ".pt") and file.name not in _REWRITTEN:
                shutil.copy2(file, staging / file.name)
        base = base_model or str(source)
        record = hub.provenance(
            pruner.config,
            report,
            base_model=base,
            base_revision=hub.local_revision(source),
            calibration=calibration or pruner.calibration,
        )
        hub.write_provenance(staging, record, hub.base_license(str(source)), repo_id)
    return report
