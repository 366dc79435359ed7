"""Prune a checkpoint straight from its safetensors shards to a new checkpoint, one block at a time.

For models larger than memory: the model is built with empty (meta) weights. The small parts
outside the decoder blocks (final norm, position tables) are loaded up front; of the input
embedding matrix only the rows of the calibration tokens are read, and the output head is never
loaded (the pruner never runs it). Each block is read from the shards when its turn comes,
calibrated, pruned and propagated by the same pipeline as in memory (``rose_hf.pipeline``, with
``CheckpointHome`` as the blocks' home), written to its own output shard, and dropped; the
calibration activations wait between blocks in a scratch file (``activations="disk"``, the default
here). Peak memory is about one block plus its working set, not the model. The tensors outside the
blocks are copied to the output byte for byte, but those a transform changes (``rotation="residual"``
rotates the embeddings and head): it edits them through ``CheckpointHome.edit``, which stages them
for the output. The meta model never leaves this module, so nothing
can ask to save it.

    report = prune_checkpoint("llama-70b/", "llama-70b-rose-50/", RoseConfig(sparsity=0.5), calib)
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rose_hf.card import base_license
from rose_hf.config import RoseConfig
from rose_hf.data import Batch, as_batches, describe_calibration, fingerprint, unique_ids
from rose_hf.distributed import World, current_world
from rose_hf.errors import LAYER_NOT_SAVED, RotationError
from rose_hf.homes import Home
from rose_hf.modeling import empty_model, find_blocks, own_weights
from rose_hf.pipeline import Extensions, prune_model
from rose_hf.report import PruneReport
from rose_hf.resume import Progress, fresh_output, resumable_output, run_key
from rose_hf.rotating import resolve_rotation
from rose_hf.runtime import fix_mmap_threshold, release_free_memory, resolve_device
from rose_hf.shards import (
    WEIGHTS_INDEX,
    CheckpointReader,
    copy_tensors,
    entry_size,
    plan_shards,
    read_header,
    read_rows,
    torch_dtype,
)


class CheckpointHome(Home):
    """Blocks that live in a checkpoint's shards until their turn and go to new shards after it.

    Args:
        source: The checkpoint folder. ``model`` must be its ``empty_model``.
        staging: Folder receiving each block's ``part-*.safetensors``, then ``finish``'s index.
        device: Where a block is loaded for its turn.
        world: Only its rank 0 writes.
        max_shard_size: No shard holds more tensor bytes than this (a block larger than it is
            split, as ``save_pretrained`` would; blocks are never merged, so memory stays one block).
        progress: Where an interrupted run of the same recipe stopped (``rose_hf.resume``): its
            finished blocks are read back from the shards it staged, and progress is recorded.
    """

    def __init__(
        self,
        source: str | Path,
        model: nn.Module,
        config: RoseConfig,
        staging: Path,
        device: torch.device,
        world: World,
        max_shard_size: int | str = "5GB",
        progress: Progress | None = None,
    ) -> None:
        self.reader = CheckpointReader(source)
        self.model, self.staging, self.device, self.world = model, staging, device, world
        self.max_shard_size = max_shard_size
        self.block_path, _ = find_blocks(model, config.block_path)
        self.progress = progress
        # (file, tensor names, tensor bytes) of every shard written so far, an interrupted run's too
        self.shards: list[tuple[str, list[str], int]] = (
            [(file, list(names), int(size)) for file, names, size in progress.shards] if progress else []
        )
        names = set(self.reader.names())
        expected = {name for name, _ in model.named_parameters()}
        self.embedding_names = own_weights(model, model.get_input_embeddings())  # type: ignore[operator]
        # The head never runs here (capture stops at the last block) and is copied to the output as
        # stored, under whatever name the checkpoint uses, so it is neither loaded nor looked for.
        self.head_names = own_weights(model, model.get_output_embeddings())  # type: ignore[operator]
        missing = sorted(expected - names - self.head_names - self.embedding_names)
        if missing:
            raise ValueError(
                f"the checkpoint lacks {len(missing)} weights the model needs, e.g. {missing[0]!r}; streaming needs "
                "checkpoint names that match the model's (re-save it with save_pretrained)."
            )
        embed = model.get_input_embeddings()  # type: ignore[operator]
        embed_path = next((n for n, m in model.named_modules() if m is embed), "")
        # Where the embedding matrix is stored (under the head's name, for some tied checkpoints)
        stored = (f"{embed_path}.weight", *sorted(self.head_names))
        self.embedding_stored = next((n for n in stored if n in names), None)
        # Tensors outside the blocks that a transform changed (``edit``): name -> staged file
        self.changed: dict[str, str] = {}
        prefix = f"{self.block_path}."
        # What the blocks' inputs need besides the embedding rows (learned positions, say); read on
        # every capture, since ``after_capture`` frees it (a sparsity plan's dense pass captures too).
        self.outside = sorted(
            name
            for name in names
            if not name.startswith(prefix) and name in expected and name not in self.embedding_names | self.head_names
        )

    def before_capture(self, batches: list[Batch]) -> None:
        """Read only the embedding rows of the calibration tokens; the other rows stay unset and
        are never read (a 128k-token vocabulary costs a few megabytes here, not the matrix)."""
        for name in self.outside:
            self._materialize(self.model, name, torch.device("cpu"))
        rows = unique_ids(batches)
        stored_heads = sorted(self.head_names & set(self.reader.files))
        # The names now: a transform may have untied the head (``edit``).
        for name in sorted(own_weights(self.model, self.model.get_input_embeddings())):  # type: ignore[operator]
            # A tied matrix may be stored under the head's name only.
            stored = name if name in self.reader.files else next(iter(stored_heads), None)
            if stored is None:
                raise ValueError(f"the checkpoint stores neither {name!r} nor an output head tied to it.")
            entry = self.reader.entry(stored)
            table = torch.empty(entry["shape"], dtype=torch_dtype(entry["dtype"]))
            if name in self.changed:  # rotated by a transform: its rows as changed
                table[rows] = read_rows(self.staging / self.changed[name], name, rows)
            else:
                table[rows] = read_rows(self.reader.files[stored], stored, rows)
            set_module_tensor_to_device(self.model, name, torch.device("cpu"), value=table, dtype=table.dtype)

    def after_capture(self) -> None:
        """Free everything outside the blocks: ``finish`` copies it from the source checkpoint."""
        # ``remove_duplicate=False``: a head tied to the embeddings holds the same tensor and must let
        # go of it too, or nothing is freed.
        prefix = f"{self.block_path}."
        for name, _ in list(self.model.named_parameters(remove_duplicate=False)):
            if not name.startswith(prefix):
                set_module_tensor_to_device(self.model, name, "meta")
        release_free_memory()

    def done(self, index: int) -> bool:
        """Whether an interrupted run already pruned and wrote block ``index``."""
        return self.progress is not None and index < self.progress.blocks_done

    def restore(self, report: PruneReport) -> None:
        """The interrupted run's report rows, so the report covers every module."""
        if self.progress is not None:
            report.modules.extend(self.progress.rows())

    def enter(self, index: int, block: nn.Module) -> None:
        """Read block ``index``'s weights onto the compute device: from the source shards, or for
        a block ``done`` already, its pruned weights from the shards staged for the output."""
        prefix = f"{self.block_path}.{index}."
        staged = (
            {name: self.staging / file for file, names, _ in self.shards for name in names} if self.done(index) else {}
        )
        for name, _ in list(block.named_parameters()):
            if prefix + name in staged:
                with safe_open(str(staged[prefix + name]), framework="pt") as handle:
                    value = handle.get_tensor(prefix + name)
                set_module_tensor_to_device(block, name, self.device, value=value, dtype=value.dtype)
            else:
                self._materialize(block, name, self.device, prefix)
        block.to(self.device)

    def leave(self, index: int, block: nn.Module) -> None:
        """Write block ``index`` to its own shard (rank 0 only) and free it."""
        if self.done(index):  # written by the interrupted run
            block.to("meta")
            return
        prefix = f"{self.block_path}.{index}."
        tensors = {prefix + name: t.detach().to("cpu").contiguous() for name, t in block.state_dict().items()}
        tensors = {name: t for name, t in tensors.items() if name in self.reader.files}
        if self.world.lead:  # under torch.distributed every rank has the same weights
            sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
            for names in plan_shards(sizes, self.max_shard_size):
                file = f"part-{len(self.shards):05d}.safetensors"
                save_file({name: tensors[name] for name in names}, str(self.staging / file), metadata={"format": "pt"})
                self.shards.append((file, sorted(names), sum(sizes[name] for name in names)))
        block.to("meta")  # frees the block's memory

    @contextlib.contextmanager
    def visit(self, index: int, block: nn.Module) -> Iterator[None]:
        """Block ``index``'s weights from the source shards (dense, even for a block an interrupted
        run finished), freed after the look; nothing is written."""
        prefix = f"{self.block_path}.{index}."
        try:
            for name, _ in list(block.named_parameters()):
                self._materialize(block, name, self.device, prefix)
            block.to(self.device)
            yield
        finally:
            block.to("meta")

    def block_done(self, index: int, report: PruneReport) -> None:
        """Record that blocks ``0..index`` are written, so a killed run resumes after ``index``."""
        if self.progress is not None:
            self.progress.record(self.staging, index + 1, self.shards, report)

    def tidy(self) -> None:
        """Hand freed heap pages back: the next step would only partly reuse them."""
        release_free_memory()

    def holds_weights(self, module: nn.Module) -> bool:
        """No: a block's weights are read from disk on its turn."""
        return False

    @contextlib.contextmanager
    def edit(self, model: nn.Module, module: nn.Module) -> Iterator[None]:
        """Read ``module``'s weights (as changed so far; a head tied to the embeddings from the
        matrix stored for both) for the body; after it, stage each of its parameters, changed or
        new, for the output in place of the source's tensor. Nothing is staged if the body raises."""
        names = {name.rsplit(".", 1)[-1]: name for name in own_weights(model, module)}
        try:
            for local, name in names.items():
                value = self._value(name)
                set_module_tensor_to_device(module, local, torch.device("cpu"), value=value, dtype=value.dtype)
            yield
            for name in sorted(own_weights(model, module)):
                tensor = model.get_parameter(name).detach().to("cpu").contiguous()
                file = f"outside-{name}.safetensors"
                save_file({name: tensor}, str(self.staging / file), metadata={"format": "pt"})
                self.changed[name] = file
        finally:
            module.to("meta")
            release_free_memory()

    def _value(self, name: str) -> torch.Tensor:
        """Tensor ``name`` outside the blocks: as changed, as stored, or (a tied head) the embeddings."""
        if name in self.changed:
            with safe_open(str(self.staging / self.changed[name]), framework="pt") as handle:
                return handle.get_tensor(name)
        if name in self.reader.files:
            return self.reader.get(name)
        if name in self.head_names and self.embedding_stored is not None:  # tied: stored once
            return self._value(self.embedding_stored)
        raise ValueError(f"the checkpoint does not store {name!r}.")

    def finish(self) -> None:
        """Write the tensors outside the blocks and the shard index with transformers' names."""
        prefix = f"{self.block_path}."
        for name, file in sorted(self.changed.items()):
            self.shards.append((file, [name], entry_size(read_header(self.staging / file)[1][name])))
        rest = {
            name: file
            for name, file in self.reader.files.items()
            if not name.startswith(prefix) and name not in self.changed
        }
        sizes = {name: entry_size(self.reader.entry(name)) for name in rest}
        for names in plan_shards(sizes, self.max_shard_size):
            file = f"part-{len(self.shards):05d}.safetensors"
            copy_tensors({name: rest[name] for name in names}, self.staging / file, metadata={"format": "pt"})
            self.shards.append((file, sorted(names), sum(sizes[name] for name in names)))
        count = len(self.shards)
        weight_map: dict[str, str] = {}
        for number, (part, names, _) in enumerate(self.shards, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            (self.staging / part).rename(self.staging / final)
            weight_map.update(dict.fromkeys(names, final))
        # total_size counts tensor bytes, as transformers writes it, not the files' headers.
        total = sum(size for _, _, size in self.shards)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.staging / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def _materialize(self, root: nn.Module, name: str, device: torch.device, prefix: str = "") -> None:
        value = self._value(prefix + name)
        set_module_tensor_to_device(root, name, device, value=value, dtype=value.dtype)


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
    extensions: Extensions | None = None,
    max_shard_size: int | str = "5GB",
) -> PruneReport:
    """Prune the checkpoint folder ``source`` into ``output`` without loading the whole model.

    The output holds the same tensors (bitwise, on CPU) as pruning in memory and saving: a shard per
    block (split beyond ``max_shard_size``) and the rest copied byte for byte (or as a transform
    changed it), the source's config without compression metadata, its tokenizer and generation
    files, ``rose_config.json`` and a card, written all or nothing; a run killed part way resumes
    when called again (``rose_hf.resume``).
    ``activations``: where calibration hidden states wait between blocks (``"disk"``: a scratch
    folder in the staging folder; ``"memory"``: faster when they fit). ``mmap_threshold`` (bytes)
    fixes glibc's mmap threshold for the process (``rose_hf.runtime.fix_mmap_threshold``; the CLI's
    ``--stream`` passes 1 MiB). Under ``torch.distributed`` every rank calls it alike; only rank 0
    writes. ``extensions`` plug in as for ``RosePruner`` (a transform sees each block once read).
    """
    from rose_hf import output as out

    source = Path(source)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{str(source)!r} has no config.json; pass a local checkpoint folder.")
    plan_shards({}, max_shard_size)  # a size it cannot read fails here, before any work
    if config.rotation == "layer":
        raise RotationError(LAYER_NOT_SAVED)
    config = resolve_rotation(config, empty_model(source))  # the recipe records what ran
    if mmap_threshold is not None and not fix_mmap_threshold(mmap_threshold):
        warnings.warn("mmap_threshold is ignored: this C library is not glibc.", stacklevel=2)
    world, extensions = current_world(), extensions or Extensions()
    if not world.lead:
        # Other ranks compute their share and receive every pruned weight, but only rank 0 writes.
        with tempfile.TemporaryDirectory() as scratch:
            return _prune_into(
                source, Path(scratch), config, calib, world, activations, None, extensions, max_shard_size, False
            )[0]
    batches = as_batches(calib) if calib is not None else []
    staged: AbstractContextManager[tuple[Path, Progress | None]]
    if world.size == 1 and config.objective != "dense":  # resumable (rose_hf.resume)
        key = run_key(source, config, fingerprint(batches), max_shard_size)
        staged = resumable_output(Path(output), overwrite, key)
    else:
        staged = fresh_output(out.staged_output(Path(output), overwrite))
    # The batches, not ``calib`` again: a one-shot iterable (a generator) is read once, above.
    normalised = batches if calib is not None else None
    with staged as (staging, resume_state):
        report, batches = _prune_into(
            source, staging, config, normalised, world, activations, resume_state, extensions, max_shard_size, progress
        )
        out.copy_side_files(source, staging)
        if report.untied_parameters:  # rotation="residual" gave the head its own weight
            out.untie_in_config(staging)
        record = out.record_for(
            config,
            report,
            calibration or describe_calibration(calib, batches, config.seed),
            base_model=base_model or str(source),
            folder=source,
        )
        out.write_provenance(staging, record, base_license(str(source)), repo_id)
    return report


def _prune_into(
    source: Path,
    staging: Path,
    config: RoseConfig,
    calib: Any,
    world: World,
    activations: str,
    progress: Progress | None,
    extensions: Extensions,
    max_shard_size: int | str,
    progress_bar: bool,
) -> tuple[PruneReport, list[Batch]]:
    model = empty_model(source)
    device = resolve_device(config.device, world)
    home = CheckpointHome(source, model, config, staging, device, world, max_shard_size, progress)
    result = prune_model(
        model,
        config,
        calib,
        home,
        device=device,
        world=world,
        activations=activations,
        scratch_dir=staging,
        progress=progress_bar,
        extensions=extensions,
    )
    if world.lead:
        home.finish()
    return result
