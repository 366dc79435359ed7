"""``RosePruner``: prune a transformers model in place, one decoder block at a time.

Per block: move it to the compute device -> calibrate (hooks collect ``H``; each forward stops after
the last module's input) -> prune every target module -> propagate the calibration inputs through the
*pruned* block (hooks off; not needed after the last block) -> move it back. With
``true_sequential`` the middle three steps are one forward of all batches side by side
(``rose_hf.lockstep``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from rose_hf.activations import Activations, check_place
from rose_hf.baselines import magnitude_prune, wanda_prune
from rose_hf.config import RoseConfig
from rose_hf.data import Batch, as_batches, count_tokens, fingerprint
from rose_hf.distributed import (
    World,
    broadcast_object,
    broadcast_tensor,
    current_world,
    gather_objects,
    local_cuda_device,
)
from rose_hf.hessian import HessianCollector
from rose_hf.lockstep import Lockstep, decide
from rose_hf.modeling import (
    BlockCall,
    capture_calls,
    find_blocks,
    module_device,
    run_block,
    target_modules,
    weight_matrix,
    write_weight,
)
from rose_hf.offload import Onloaded, execution_device, offload, onload
from rose_hf.ordering import rose_decision
from rose_hf.report import ModuleReport, PruneReport
from rose_hf.sparsegpt import dense_target_weights, reconstruction_error, sparsegpt_prune

logger = logging.getLogger(__name__)


def resolve_device(device: str | None, world: World | None = None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` means CUDA when available (the rank's own GPU
    under ``torchrun``), else CPU."""
    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return local_cuda_device(world) if world is not None and world.active else torch.device("cuda")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:0'.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available; use device='cpu'.")
    return resolved


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Disable TF32 for the duration (pruning needs full fp32), restoring the caller's flags."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def prune_matrix(
    W: torch.Tensor, H: torch.Tensor | None, config: RoseConfig, C: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Prune one ``(out, in)`` matrix with ``config.method``; return new weights and report fields.

    ``C`` is the cross term of ``objective="dense"`` (``HessianCollector.crosses``); with it the
    reconstructing methods start from ``dense_target_weights`` instead of ``W``.
    """
    n, m = config.nm
    sparsity = float(config.sparsity or 0.0)
    if config.method == "magnitude" or H is None:
        weight, _ = magnitude_prune(W, sparsity, n=n, m=m)
        return weight, {"method": "magnitude"}
    if config.method == "wanda":
        weight, _ = wanda_prune(W, H, sparsity, n=n, m=m)
        return weight, {"method": "wanda"}
    if C is not None:
        W = dense_target_weights(W, H, C, config.correction_damp or config.percdamp)
    info: dict[str, Any] = {"method": config.method}
    perm, blocks = None, None
    if config.method == "rose":
        decision = rose_decision(
            W,
            H,
            sparsity,
            config.blocksize,
            n=n,
            m=m,
            threshold=config.reorder_threshold,
            mode=config.reorder,
            score=config.score,
            percdamp=config.percdamp,
        )
        info["relative_range"] = decision.relative_range
        info["reordered"] = decision.order is not None
        if decision.order is not None:
            perm, blocks = decision.order.perm, decision.order.blocks
    result = sparsegpt_prune(
        W, H, sparsity, n=n, m=m, blocksize=config.blocksize, percdamp=config.percdamp, perm=perm, blocks=blocks
    )
    info["damp_scale"] = result.damp_scale
    return result.weight, info


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc only; a no-op elsewhere).

    glibc raises its mmap threshold after large frees, so the activations and Hessians of one block
    end up on the heap and, once freed, stay in the process's resident set. Between blocks nothing
    of them is alive; trimming then keeps the resident set at what is really in use instead of the
    high-water mark of all blocks so far (docs/performance.md has the measurement).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def fix_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` for the rest of the process; ``False`` off glibc.

    By default glibc raises the threshold to the size of the largest block freed so far (up to
    32 MiB), so a pruner's large temporaries (Hessian-sized matrices, activations) come from the
    heap, where freed space fragments and stays resident. With a fixed threshold every allocation
    above it is its own mapping and goes back to the OS when freed: the resident set follows what is
    live, at the price of fresh zeroed pages on every large allocation (docs/performance.md measures
    both). This is a process-wide setting; streaming mode applies it only when asked to
    (``prune_checkpoint(mmap_threshold=...)``, on by default in ``rose-hf prune --stream``).
    """
    if nbytes <= 0:
        raise ValueError(f"mmap_threshold={nbytes} must be a positive number of bytes, e.g. 1048576 (1 MiB).")
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, nbytes))


_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def _malloc_trim() -> Any:
    return _libc_function("malloc_trim")


@functools.cache
def _libc_function(name: str) -> Any:
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


class RosePruner:
    """Prune a transformers causal LM in place with ROSE (or a baseline) from calibration data.

    Args:
        model: A loaded ``PreTrainedModel`` (any device placement; blocks return where they were).
        config: A ``RoseConfig``; ``RoseConfig()`` (ROSE, 50 % unstructured) when omitted.
        observer: Optional ``observer(name, W, H)`` called before each module is pruned with its
            dense ``(out, in)`` weight and its Hessian (``None`` for magnitude), for per-layer
            analysis. It must not modify them.
        activations: Where the calibration hidden states wait between blocks: ``"memory"`` (on the
            compute device; fastest) or ``"disk"`` (files in ``scratch_dir``; one batch in memory at
            a time, for calibration sets larger than memory). The result is the same.
        scratch_dir: Folder for ``activations="disk"`` (default: the system's temporary folder);
            a subfolder is created there and removed when pruning ends.

    Example::

        report = RosePruner(model, RoseConfig(sparsity=0.6)).prune(calib_loader)
        model.save_pretrained("out")
    """

    def __init__(
        self,
        model: nn.Module,
        config: RoseConfig | None = None,
        observer: Callable[[str, torch.Tensor, torch.Tensor | None], None] | None = None,
        *,
        activations: str = "memory",
        scratch_dir: str | Path | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch nn.Module (a transformers model); got {type(model).__name__}.")
        self.model = model
        self.config = config if config is not None else RoseConfig()
        if not isinstance(self.config, RoseConfig):
            raise TypeError(f"config must be a RoseConfig; got {type(self.config).__name__}.")
        self.world = current_world()
        self.device = resolve_device(self.config.device, self.world)
        self.observer = observer
        self.activations = check_place(activations)
        self.scratch_dir = scratch_dir
        self._home = torch.device("cpu")
        self._onloaded: Onloaded | None = None
        self.report: PruneReport | None = None
        self.calibration: dict[str, Any] = {}

    def prune(self, calib: Any = None, *, progress: bool = True) -> PruneReport:
        """Prune every target module of every decoder block; returns a ``PruneReport``.

        Args:
            calib: Calibration token ids in any form ``rose_hf.data.as_batches`` accepts. Only
                ``method="magnitude"`` may omit it.
            progress: Show a tqdm bar over the blocks.

        Under ``torch.distributed`` every rank passes the same data and runs its share of it; see
        ``rose_hf.distributed``.
        """
        config = self.config
        if calib is None and config.method != "magnitude":
            raise ValueError(
                f"method={config.method!r} needs calibration data; pass token ids to prune(), "
                "e.g. rose_hf.data.sample_windows(tokenizer, text, nsamples=128, seqlen=2048)."
            )
        batches = as_batches(calib) if calib is not None else []
        block_path, blocks = find_blocks(self.model, config.block_path)
        report = PruneReport(config=config.to_dict(), num_batches=len(batches), num_tokens=count_tokens(batches))
        was_training = self.model.training
        started = time.perf_counter()
        self.model.eval()
        try:
            with torch.no_grad(), exact_float32():
                if config.method == "magnitude":
                    self._prune_magnitude(blocks, block_path, report, progress)
                else:
                    self._prune_calibrated(blocks, block_path, self.world.share(batches), report, progress)
        finally:
            self.model.train(was_training)
        report.seconds = time.perf_counter() - started
        logger.info(report.summary())
        self.report = report
        self.calibration = {
            "source": getattr(calib, "source", None) or type(calib).__name__,
            "nsamples": len(batches),
            "seqlen": int(batches[0]["input_ids"].shape[1]) if batches else None,
            "seed": config.seed,
            "sha256": fingerprint(batches),
        }
        return report

    def save_pretrained(
        self,
        output_dir: str | Path,
        *,
        tokenizer: Any = None,
        base_model: str | None = None,
        calibration_source: str | None = None,
        perplexity: dict[str, Any] | None = None,
        overwrite: bool = False,
        max_shard_size: str | int = "5GB",
        repo_id: str | None = None,
    ) -> Path:
        """Save the pruned model with ``rose_config.json`` provenance and a model card.

        A plain ``model.save_pretrained`` also works; this adds the recipe, versions, calibration
        hash and per-module results, and writes all or nothing (see ``rose_hf.hub.save_pruned``).
        ``base_model`` defaults to the model's ``name_or_path``.
        """
        from rose_hf import hub

        if self.report is None:
            raise RuntimeError("nothing to save yet: call prune() first.")
        model_config = getattr(self.model, "config", None)
        base = base_model or getattr(model_config, "_name_or_path", None) or None
        calibration = dict(self.calibration)
        if calibration_source:
            calibration["source"] = calibration_source
        record = hub.provenance(
            self.config,
            self.report,
            base_model=base,
            base_revision=getattr(model_config, "_commit_hash", None) or (hub.local_revision(base) if base else None),
            calibration=calibration,
            perplexity=perplexity,
        )
        return hub.save_pruned(
            self.model,
            output_dir,
            record,
            tokenizer=tokenizer,
            license=hub.base_license(base),
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            repo_id=repo_id,
        )

    def _tidy(self) -> None:
        """Called after calibrating a block and after each module; streaming mode trims the heap here."""

    def _before_capture(self, batches: list[Batch]) -> None:
        """Streaming mode loads the embedding rows of the calibration tokens here."""

    def _after_capture(self) -> None:
        """The block inputs are captured; streaming mode frees the embeddings here."""

    def _enter_block(self, index: int, block: nn.Module) -> None:
        """Make block ``index`` ready on the compute device (streaming mode loads it here).

        A block dispatched by accelerate stays on its execution device; its offloaded weights are
        loaded there for the block's turn (``rose_hf.offload``).
        """
        dispatched = execution_device(block)
        if dispatched is not None:
            self._onloaded = onload(block, dispatched)
            return
        self._home = module_device(block)
        block.to(self.device)

    def _leave_block(self, index: int, block: nn.Module) -> None:
        """Done with block ``index``: send it back where it was (streaming mode writes it out)."""
        if self._onloaded is not None:
            offload(self._onloaded)
            self._onloaded = None
            return
        block.to(self._home)

    def _prune_magnitude(self, blocks: nn.ModuleList, block_path: str, report: PruneReport, progress: bool) -> None:
        for index, block in enumerate(
            tqdm(blocks, desc="rose_hf magnitude", disable=not progress or self.world.rank != 0)
        ):
            self._enter_block(index, block)
            modules = target_modules(block, f"{block_path}.{index}", self.config.targets, self.config.ignore)
            for name, module in modules.items():
                self._prune_module(name, module, None, report)
            self._leave_block(index, block)

    def _prune_calibrated(
        self, blocks: nn.ModuleList, block_path: str, batches: list[Batch], report: PruneReport, progress: bool
    ) -> None:
        config, device = self.config, self.device
        tick = time.perf_counter()
        self._before_capture(batches)
        with contextlib.ExitStack() as stack:
            hidden = stack.enter_context(Activations(self.activations, device, self.scratch_dir))
            _, calls = capture_calls(self.model, blocks, batches, sink=hidden.append)
            # objective="dense": the dense model's activations for the same tokens travel alongside.
            dense_hidden = None
            if config.objective == "dense":
                dense_hidden = stack.enter_context(Activations(self.activations, device, self.scratch_dir))
                for k in range(len(hidden)):
                    dense_hidden.append(hidden[k].clone())
            self._after_capture()
            report.capture_seconds = time.perf_counter() - tick
            self._run_blocks(blocks, block_path, batches, calls, hidden, dense_hidden, report, progress)

    def _run_blocks(
        self,
        blocks: nn.ModuleList,
        block_path: str,
        batches: list[Batch],
        calls: list[list[BlockCall]],
        hidden: Activations,
        dense_hidden: Activations | None,
        report: PruneReport,
        progress: bool,
    ) -> None:
        config = self.config
        masks = [batch.get("attention_mask") for batch in batches]
        bar = tqdm(total=len(blocks), desc=f"rose_hf {config.method}", disable=not progress or self.world.rank != 0)
        try:
            for index, block in enumerate(blocks):
                self._enter_block(index, block)
                modules = target_modules(block, f"{block_path}.{index}", config.targets, config.ignore)
                last = index + 1 == len(blocks)  # nothing reads the last block's outputs
                if config.true_sequential:
                    self._run_block_in_lockstep(index, block, modules, calls[index], hidden, masks, report, last)
                else:
                    self._run_block_in_two_passes(
                        block, modules, calls[index], hidden, dense_hidden, masks, report, last
                    )
                self._leave_block(index, block)
                release_free_memory()
                bar.update(1)
        finally:
            bar.close()

    def _run_block_in_two_passes(
        self,
        block: nn.Module,
        modules: dict[str, nn.Module],
        calls: list[BlockCall],
        hidden: Activations,
        dense_hidden: Activations | None,
        masks: list[torch.Tensor | None],
        report: PruneReport,
        last: bool,
    ) -> None:
        """The default: calibrate every module on the dense block's inputs (each forward stops after the
        last module's input), prune them, then propagate the inputs through the pruned block."""
        device = self.device
        tick = time.perf_counter()
        with HessianCollector(modules, stop_early=True) as collector:
            for k, (call, mask) in enumerate(zip(calls, masks)):
                x = hidden[k]
                collector.set_token_mask(mask)
                if dense_hidden is not None:
                    with collector.reference_pass():  # the block is still dense here
                        dense_hidden[k] = run_block(block, dense_hidden[k], call, device)
                collector.run(functools.partial(run_block, block, x, call, device))
        if self.world.active:
            collector.all_reduce()
        hessians, crosses = collector.hessians(), collector.crosses()
        del collector  # its raw sums: the Hessians above are new tensors
        self._tidy()
        report.calibrate_seconds += time.perf_counter() - tick
        tick = time.perf_counter()
        for name, module in modules.items():
            # Popped: a Hessian is freed as soon as the last module sharing it is pruned.
            H, C = hessians.pop(name, None), crosses.pop(name, None)
            self._prune_module(name, module, H, report, C)
            del H, C
        del hessians, crosses
        report.prune_seconds += time.perf_counter() - tick
        if not last:
            self._propagate(block, calls, hidden, report)

    def _propagate(self, block: nn.Module, calls: list[BlockCall], hidden: Activations, report: PruneReport) -> None:
        """Replace each batch's hidden states by the (pruned) block's output, in place: one set alive."""
        tick = time.perf_counter()
        for k, call in enumerate(calls):
            hidden[k] = run_block(block, hidden[k], call, self.device)
        report.propagate_seconds += time.perf_counter() - tick

    def _run_block_in_lockstep(
        self,
        index: int,
        block: nn.Module,
        modules: dict[str, nn.Module],
        calls: list[BlockCall],
        hidden: Activations,
        masks: list[torch.Tensor | None],
        report: PruneReport,
        last: bool,
    ) -> None:
        """``true_sequential``: one side-by-side forward of all batches prunes each module when every
        batch waits at its input, and its outputs are the pruned block's (``rose_hf.lockstep``)."""
        started = time.perf_counter()
        prune_seconds = 0.0
        pruned: set[str] = set()
        forwards = [functools.partial(self._lockstep_forward, block, hidden, k, call) for k, call in enumerate(calls)]
        with HessianCollector(modules) as collector:
            samples = []
            for mask in masks:
                collector.set_token_mask(mask)
                samples.append(collector.sample())
            runner = Lockstep(forwards, lambda k: collector.use_sample(samples[k]))
            collector.set_after_input(runner.pause)
            try:
                while True:
                    mine = runner.step()
                    action, detail = decide(gather_objects(mine) if self.world.active else [mine], pruned)
                    if action != "prune":
                        break
                    tick = time.perf_counter()
                    self._prune_module(detail, modules[detail], collector.hessian(detail, self.world.active), report)
                    pruned.add(detail)
                    prune_seconds += time.perf_counter() - tick
                if action == "diverge":
                    runner.finish()
                    if self.world.rank == 0:
                        warnings.warn(
                            f"block {index}: true_sequential stopped because {detail}; the block's remaining "
                            "modules are pruned on the inputs of a forward in which they were still dense.",
                            stacklevel=5,
                        )
                tick = time.perf_counter()
                for name, module in modules.items():  # after "done": modules no batch called
                    if name not in pruned:
                        self._prune_module(name, module, collector.hessian(name, self.world.active), report)
                prune_seconds += time.perf_counter() - tick
            finally:
                runner.close()
                collector.set_after_input(None)  # no cycle: the forwards' state goes with this frame
                samples.clear()
            if collector.late and self.world.rank == 0:
                warnings.warn(
                    f"block {index}: {sorted(collector.late)} got inputs after being pruned (called more than "
                    "once per forward); only their first call's inputs were used.",
                    stacklevel=5,
                )
        report.prune_seconds += prune_seconds
        report.calibrate_seconds += time.perf_counter() - started - prune_seconds
        if action == "done":
            for k, output in enumerate(runner.results):
                hidden[k] = output
        elif not last:  # the forward's outputs came partly from dense modules: propagate once more
            self._propagate(block, calls, hidden, report)
        runner.results.clear()

    def _lockstep_forward(self, block: nn.Module, hidden: Activations, k: int, call: BlockCall) -> torch.Tensor:
        return run_block(block, hidden[k], call, self.device)

    def _prune_module(
        self, name: str, module: nn.Module, H: torch.Tensor | None, report: PruneReport, C: torch.Tensor | None = None
    ) -> None:
        tick = time.perf_counter()
        W = weight_matrix(module).detach()
        if H is None and self.config.method != "magnitude" and self.world.rank == 0:
            warnings.warn(
                f"{name} saw no calibration token (an unused expert?); pruned by magnitude instead.",
                stacklevel=3,
            )
        if self.observer is not None:
            self.observer(name, W, H)
        owner = self.world.owner(len(report.modules))
        if self.world.rank == owner:
            new_weight, info = prune_matrix(W, H, self.config, C)
        else:
            new_weight, info = torch.empty(W.shape, dtype=torch.float32, device=W.device), {}
        if self.world.active:
            new_weight = broadcast_tensor(new_weight.contiguous(), owner)
            info = broadcast_object(info, owner)
        error, relative = reconstruction_error(W, new_weight, H) if H is not None else (float("nan"), float("nan"))
        write_weight(module, new_weight)
        stored = weight_matrix(module)
        report.modules.append(
            ModuleReport(
                name=name,
                method=info["method"],
                shape=(int(W.shape[0]), int(W.shape[1])),
                sparsity=float((stored == 0).float().mean().item()),
                error=error,
                relative_error=relative,
                reordered=bool(info.get("reordered", False)),
                relative_range=float(info.get("relative_range", 0.0)),
                damp_scale=float(info.get("damp_scale", 1.0)),
                seconds=time.perf_counter() - tick,
            )
        )
        del W, new_weight, stored
        self._tidy()

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool = False,
        create_pr: bool = False,
        endpoint: str | None = None,
        **save_kwargs: Any,
    ) -> Any:
        """``save_pretrained`` into a temporary folder, then ``rose_hf.hub.push_pruned`` it.

        Skips the upload (``result.skipped``) when the repository already holds the same recipe.
        """
        import tempfile

        from rose_hf import hub

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", repo_id=repo_id, **save_kwargs)
            return hub.push_pruned(
                folder, repo_id, token=token, private=private, create_pr=create_pr, endpoint=endpoint
            )
