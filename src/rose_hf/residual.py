"""``rotation="residual"``: one rotation of the residual stream, merged into a plain checkpoint (plumbing).

Before the block inputs are captured, ``ResidualRotation``

1. finds, in every decoder block, the two RMSNorms and the Linears that read and write the residual
   stream (``Layout``), and refuses a model where a rotation would not merge exactly (LayerNorm with
   a mean or a bias, sandwich norms that scale a block's output, unknown Linears, fused or missing
   parts) before any weight changes;
2. runs the dense model block by block over this process's calibration batches (``dense_walk``,
   through the run's home, so the model may be streamed or offloaded), each block with its norms'
   weights folded into the Linears that read them (``folded``: for the look only), collecting the
   Hessian of each plain norm output ``x / rms(x)`` (all-reduced under ``torch.distributed``);
3. learns one orthogonal ``R`` (``rose_hf.rotation.learn_residual_rotation``) and changes what lies
   outside the blocks (``Home.edit``): the final norm folded into ``lm_head``, then ``lm_head`` and the
   embeddings ``W R``;

and on each block's turn folds its norms for good (weight 1, or 0 for Gemma's ``1 + w`` norms) and
merges ``R``: each reader ``W R``, each writer ``Rᵀ W`` (and bias).

The model computes the same function (to float rounding) and is pruned in the rotated basis by the
usual loop. Tied input and output embeddings cannot stay tied (the head carries the final norm),
so the head gets its own weight: the report's ``untied_parameters`` and the card say how many.

``LayerRotation`` (``rotation="layer"``) is the paper's per-block version, for comparison: the same
learning on each block's own readers, applied by forward hooks, so its model cannot be saved.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from rose_hf.collector import HessianCollector
from rose_hf.config import RoseConfig
from rose_hf.data import Batch
from rose_hf.distributed import World
from rose_hf.errors import LAYER_NOT_SAVED, RotationError
from rose_hf.homes import Home, LoadedHome
from rose_hf.modeling import find_blocks, module_device, run_block
from rose_hf.offload import execution_device
from rose_hf.rotation import learn_residual_rotation, rotate_rows
from rose_hf.sparsegpt import inverse_hessian
from rose_hf.steps import Run
from rose_hf.walk import Walk, dense_walk

logger = logging.getLogger(__name__)

SANDWICH_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm", "post_attention_norm")


@dataclass(frozen=True)
class Layout:
    """The residual-stream parts of one decoder block: per half (attention, MLP), its norm, the
    Linears that read the norm's output and the Linear that writes back into the stream."""

    norms: tuple[nn.Module, nn.Module]
    readers: tuple[tuple[nn.Linear, ...], tuple[nn.Linear, ...]]
    writers: tuple[nn.Linear, nn.Linear]


def _refuse(where: str, why: str) -> RotationError:
    return RotationError(
        f"rotation='residual' cannot be merged into this model: {where} {why}. Use rotation='heads' or rotation='none'."
    )


def block_layout(block: nn.Module, index: int) -> Layout:
    """The ``Layout`` of a Llama-style pre-norm block (``input_layernorm`` → ``self_attn`` →
    ``post_attention_layernorm`` → ``mlp``); anything else raises ``RotationError``."""
    for name in SANDWICH_NORMS:
        if getattr(block, name, None) is not None:
            raise _refuse(f"block {index}.{name}", "scales the block's output inside the residual stream")
    norms = (getattr(block, "input_layernorm", None), getattr(block, "post_attention_layernorm", None))
    halves = (getattr(block, "self_attn", None), getattr(block, "mlp", None))
    if any(n is None for n in norms) or any(h is None for h in halves):
        raise _refuse(f"block {index}", "is not input_layernorm -> self_attn -> post_attention_layernorm -> mlp")
    readers = (
        tuple(getattr(halves[0], n) for n in ("q_proj", "k_proj", "v_proj", "qkv_proj") if hasattr(halves[0], n)),
        tuple(getattr(halves[1], n) for n in ("gate_proj", "up_proj", "gate_up_proj") if hasattr(halves[1], n)),
    )
    writers = (getattr(halves[0], "o_proj", None), getattr(halves[1], "down_proj", None))
    known = {id(m) for m in (*readers[0], *readers[1], *writers)}
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and id(module) not in known:
            raise _refuse(f"block {index}.{name}", "is a Linear this rotation does not know how to rotate")
    for group in (*readers, writers):
        if not group or not all(isinstance(m, nn.Linear) for m in group):
            raise _refuse(f"block {index}", "lacks plain nn.Linear q/k/v, o_proj, gate/up or down_proj")
    for norm in norms:
        if getattr(norm, "bias", None) is not None:
            raise _refuse(f"block {index} {type(norm).__name__}", "has a bias (a LayerNorm), which does not rotate")
    return Layout(norms, readers, writers)  # type: ignore[arg-type]


def rms_scale(norm: nn.Module, hidden: int) -> torch.Tensor:
    """The per-channel scale ``s`` of an RMS norm, ``norm(x) = x / rms(x) · s``, read by probing it;
    raises ``RotationError`` when the norm is not of that form (a LayerNorm subtracts the mean)."""
    weight = next(norm.parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, hidden, generator=generator, dtype=torch.float32).to(device)
    x[2] = x[2] + 3.0  # a row with a mean: a LayerNorm would remove it
    dtype = weight.dtype if weight is not None else torch.float32
    y = norm(x.to(dtype)).float()
    unit = x * torch.rsqrt(x.square().mean(-1, keepdim=True))
    ratios = y / unit
    s = ratios[0]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    if not torch.allclose(ratios, s.expand_as(ratios), rtol=tolerance, atol=tolerance):
        raise _refuse(type(norm).__name__, "is not an RMS norm (x / rms(x) times a weight)")
    return s


def make_plain(norm: nn.Module, hidden: int) -> None:
    """Set an RMS norm's weight so that it computes ``x / rms(x)`` (weight 1, or 0 for ``1 + w`` norms)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise _refuse(type(norm).__name__, "has no weight to set")
    saved = weight.detach().clone()
    for value in (1.0, 0.0):
        with torch.no_grad():
            weight.fill_(value)
        if torch.allclose(rms_scale(norm, hidden), torch.ones(hidden, device=weight.device), rtol=1e-3, atol=1e-3):
            return
    with torch.no_grad():
        weight.copy_(saved)
    raise _refuse(type(norm).__name__, "cannot be set to x / rms(x) by its weight")


def final_norm(model: nn.Module, block_path: str) -> nn.Module:
    """The norm between the last block and ``lm_head``: ``norm`` beside the block list."""
    parent = model.get_submodule(block_path.rsplit(".", 1)[0]) if "." in block_path else model
    norm = getattr(parent, "norm", None)
    if not isinstance(norm, nn.Module):
        raise _refuse(type(model).__name__, f"has no final norm at {block_path.rsplit('.', 1)[0]}.norm")
    return norm


def _scale_columns(linear: nn.Linear, s: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight.copy_((linear.weight.float() * s.to(linear.weight.device)).to(linear.weight.dtype))


def _rotate_inputs(weight: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    return (weight.float() @ R.to(weight.device)).to(weight.dtype)


def fold_block(layout: Layout, hidden: int) -> None:
    """Fold each norm's weight of a block into the Linears that read it; the norms become plain."""
    scales = [rms_scale(norm, hidden) for norm in layout.norms]  # checks both before changing either
    for half in range(2):
        for reader in layout.readers[half]:
            _scale_columns(reader, scales[half])
        make_plain(layout.norms[half], hidden)


@contextlib.contextmanager
def folded(layout: Layout, hidden: int) -> Iterator[None]:
    """The block folded (``fold_block``) for the body, then put back bit for bit."""
    saved = [p.detach().clone() for p in _folding_parameters(layout)]
    try:
        fold_block(layout, hidden)
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(_folding_parameters(layout), saved):
                param.copy_(value)


def _folding_parameters(layout: Layout) -> list[torch.Tensor]:
    readers = [reader.weight for half in layout.readers for reader in half]
    return readers + [p for norm in layout.norms for p in norm.parameters()]


def rotate_block(layout: Layout, R: torch.Tensor) -> None:
    """Merge ``R`` into a folded block: each reader ``W R``, each writer ``Rᵀ W`` and its bias ``b R``."""
    with torch.no_grad():
        for half in range(2):
            for reader in layout.readers[half]:
                reader.weight.copy_(_rotate_inputs(reader.weight, R))
            writer = layout.writers[half]
            Rw = R.to(writer.weight.device)
            writer.weight.copy_((Rw.T @ writer.weight.float()).to(writer.weight.dtype))
            if writer.bias is not None:
                writer.bias.copy_((writer.bias.float() @ Rw).to(writer.bias.dtype))


@dataclass
class ResidualResult:
    """What the residual rotation did: the loss before and after learning, ``R``, parameters untied."""

    losses: list[float]
    R: torch.Tensor
    untied_parameters: int


class ResidualMerge:
    """The residual rotation of one model, in the order a block loop needs it.

    ``learn`` checks the model, reads its dense blocks through ``home`` (``walk``: a ``dense_walk``
    over this process's batches), learns ``R`` and merges it outside the blocks (the final norm into
    ``lm_head``, then ``R`` into ``lm_head`` and the embeddings, through ``Home.edit``); each block
    is folded and rotated when its turn comes (``merge_block``), so a streamed or offloaded model
    never needs its weights in memory at once. The learning holds, on the host, a copy of every
    reader weight (in the weights' dtype) and two float32 hidden × hidden inverse Hessians per
    block; the compute device ``device`` sees one step's sample at a time.
    """

    def __init__(
        self,
        model: nn.Module,
        home: Home,
        device: torch.device,
        *,
        block_path: str | None = None,
        percdamp: float = 0.01,
        steps: int = 100,
        seed: int = 0,
        world: World | None = None,
        objective: str = "entropy",
        pattern: tuple[float, int, int] = (0.5, 0, 0),
    ) -> None:
        self.model, self.home, self.device, self.world = model, home, device, world
        self.percdamp, self.steps, self.seed, self.objective, self.pattern = percdamp, steps, seed, objective, pattern
        self.block_path, self.blocks = find_blocks(model, block_path)
        self.embed, self.head = model.get_input_embeddings(), model.get_output_embeddings()  # type: ignore[operator]
        if not isinstance(self.embed, nn.Embedding) or not isinstance(self.head, nn.Linear):
            raise _refuse(type(model).__name__, "has no nn.Embedding input embeddings and nn.Linear lm_head")
        self.layouts = [block_layout(block, i) for i, block in enumerate(self.blocks)]
        self.norm = final_norm(model, self.block_path)
        self.hidden = self.embed.embedding_dim
        self.R: torch.Tensor | None = None

    def learn(self, walk: Callable[[], Walk]) -> ResidualResult:
        """Learn ``R`` on the folded dense blocks and merge it outside them; no block changes."""
        groups: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        with contextlib.closing(walk()) as blocks:  # on an error too: the block put back, the scratch freed
            for index, _, forward in blocks:
                layout = self.layouts[index]
                with folded(layout, self.hidden):
                    watched = {"attention": layout.readers[0][0], "mlp": layout.readers[1][0]}
                    with HessianCollector(watched) as collector:
                        forward(lambda batch: collector.begin_forward(batch.get("attention_mask")))
                    if self.world is not None:
                        collector.all_reduce(self.world)
                    hessians = collector.hessians()
                    for half, key in enumerate(("attention", "mlp")):
                        Hinv = inverse_hessian(hessians.pop(key), self.percdamp)
                        # On the host, in the weights' dtype: the learning moves each step's sample
                        readers = [r.weight.detach().to("cpu", copy=True) for r in layout.readers[half]]
                        groups.append((readers, Hinv.to("cpu")))
                        del Hinv
        R, losses = learn_residual_rotation(
            groups,
            steps=self.steps,
            seed=self.seed,
            objective=self.objective,
            pattern=self.pattern,
            device=self.device,
        )
        del groups
        self.R = R
        return ResidualResult(losses, R, self._merge_outside(R))

    def merge_block(self, index: int, block: nn.Module) -> None:
        """Fold block ``index`` (its weights loaded) and merge ``R`` into it."""
        if self.R is None:
            raise RuntimeError("ResidualMerge.merge_block runs after learn")
        layout = self.layouts[index]  # its modules are ``block``'s, whatever weights they hold now
        fold_block(layout, self.hidden)
        rotate_block(layout, self.R)

    def _merge_outside(self, R: torch.Tensor) -> int:
        """Fold the final norm into ``lm_head``; ``R`` into it and the embeddings. Returns the
        parameters ``lm_head`` gained by being untied (0 if it was not tied)."""
        embed, head, home, model = self.embed, self.head, self.home, self.model
        # A meta model (streaming) may not share the tensor, but its config says the checkpoint does.
        tied = head.weight is embed.weight or any(getattr(c, "tie_word_embeddings", False) for c in _configs(model))
        with home.edit(model, self.norm):
            final_scale = rms_scale(self.norm, self.hidden)
            make_plain(self.norm, self.hidden)
        with home.edit(model, head), torch.no_grad():
            new_head = rotate_rows(head.weight.detach(), R, final_scale)
            if tied:
                head.weight = nn.Parameter(new_head, requires_grad=head.weight.requires_grad)
            else:
                head.weight.copy_(new_head)
        with home.edit(model, embed), torch.no_grad():
            embed.weight.copy_(rotate_rows(embed.weight.detach(), R))
        if not tied:
            return 0
        for config in {id(c): c for c in _configs(model)}.values():
            config.tie_word_embeddings = False  # type: ignore[attr-defined]
        return int(new_head.numel())


def rotate_residual(
    model: nn.Module,
    batches: list[Batch],
    *,
    block_path: str | None = None,
    percdamp: float = 0.01,
    steps: int = 100,
    seed: int = 0,
    device: torch.device | None = None,
    world: World | None = None,
    objective: str = "entropy",
    pattern: tuple[float, int, int] = (0.5, 0, 0),
) -> ResidualResult:
    """Fold the norms of ``model`` (loaded, or offloaded by accelerate), learn the residual rotation on
    ``batches`` and merge it (``objective``, ``pattern``: the loss, as in
    ``rose_hf.rotation.residual_rotation_loss``).

    The model computes the same function afterwards, to float rounding. Raises ``RotationError``
    before changing anything when the model cannot take the rotation.
    """
    first = find_blocks(model, block_path)[1][0]
    device = device or execution_device(first) or module_device(first)
    home = LoadedHome(device)
    merge = ResidualMerge(
        model,
        home,
        device,
        block_path=block_path,
        percdamp=percdamp,
        steps=steps,
        seed=seed,
        world=world,
        objective=objective,
        pattern=pattern,
    )
    result = merge.learn(lambda: dense_walk(model, merge.blocks, batches, home, device, "memory", None))
    for index, block in enumerate(merge.blocks):
        home.enter(index, block)  # an offloaded block is loaded, then written back
        merge.merge_block(index, block)
        home.leave(index, block)
    return result


class ResidualRotation:
    """The ``Transform`` of ``rotation="residual"``: ``ResidualMerge.learn`` before the capture,
    ``merge_block`` on each block's turn.

    Args:
        config: the run's config (``percdamp``, ``rotation_steps``, ``seed``, ``block_path``).
        run: the run (device, world, report, stopwatch).
        home: where the blocks live (the model may be streamed or offloaded).
        walk: a ``dense_walk`` over this process's calibration batches, on the run's activations.
    """

    def __init__(self, config: RoseConfig, run: Run, home: Home, walk: Callable[[], Walk]) -> None:
        self.config, self.run, self.home, self.walk = config, run, home, walk
        self.merge: ResidualMerge | None = None

    def before_capture(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        """Check the model, measure its dense blocks, learn ``R`` and merge it outside the blocks."""
        run = self.run
        with run.stopwatch.phase("rotate"):
            self.merge = ResidualMerge(
                model,
                self.home,
                run.device,
                block_path=self.config.block_path,
                percdamp=self.config.percdamp,
                steps=self.config.rotation_steps,
                world=run.world,
                objective=self.config.rotation_objective,
                pattern=_pattern(self.config),
            )
            result = self.merge.learn(self.walk)
        run.prune.report.rotation_losses["residual"] = [result.losses[0], result.losses[-1]]
        run.prune.report.untied_parameters = result.untied_parameters
        logger.info("residual rotation: loss %.6g -> %.6g", result.losses[0], result.losses[-1])
        run.tidy()

    def on_block(self, index: int, block: nn.Module) -> None:
        """Fold block ``index`` and merge the rotation into it."""
        assert self.merge is not None  # before_capture ran
        with self.run.stopwatch.phase("rotate"):
            self.merge.merge_block(index, block)


def _pattern(config: RoseConfig) -> tuple[float, int, int]:
    """``(sparsity, n, m)`` of the run, for the ``"dropped"`` objective: a rotation of inputs that
    several modules share reads the run's sparsity, not a plan's per-module one."""
    return (float(config.sparsity or 0.0), *config.nm)


def _configs(model: nn.Module) -> list[object]:
    """The model's config and its text config (where ``tie_word_embeddings`` may live)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    found = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        found.append(get_text_config())
    return found


class LayerRotation:
    """The ``Transform`` of ``rotation="layer"`` (DenoiseRotator's per-layer R1, for evaluation only).

    Per block and half (attention, MLP), one rotation ``R`` of the input that the half's reader
    Linears share (q/k/v, gate/up), learned on their Hessian: each reader becomes ``W R`` and a
    forward pre-hook turns its input ``x`` into ``x R``. The hooks are not weights, so the model
    cannot be saved: its ``save_pretrained`` and ``push_to_hub`` raise (``LAYER_NOT_SAVED``), as
    does ``rose_hf.output.save_pruned``. Sandwich norms do not matter here (Gemma 2/3 work).
    """

    def __init__(self, config: RoseConfig, run: Run) -> None:
        self.config, self.run = config, run

    def before_capture(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        """Refuse offloaded models and blocks without q/k/v and gate/up; make saving raise."""
        if any(p.is_meta for p in model.parameters()):
            raise RotationError(
                "rotation='layer' adds forward hooks to the model, so it needs the whole model in memory: it "
                "does not run under offload (or streaming). Load the model into memory, or use rotation='residual' "
                "or 'heads', which run offloaded."
            )
        for index, block in enumerate(blocks):
            layer_readers(block, index)

        def refuse(*args: object, **kwargs: object) -> None:
            raise RotationError(LAYER_NOT_SAVED)

        model.save_pretrained = refuse  # type: ignore[assignment]
        model.push_to_hub = refuse  # type: ignore[assignment]

    def on_block(self, index: int, block: nn.Module) -> None:
        """Learn and apply the two input rotations of block ``index``."""
        run = self.run
        assert run.hidden is not None  # a calibrating step captured the block inputs
        halves = layer_readers(block, index)
        with run.stopwatch.phase("rotate"):
            watched = {"attention": halves[0][0], "mlp": halves[1][0]}
            with HessianCollector(watched) as collector:
                for k, (call, mask) in enumerate(zip(run.calls[index], run.masks)):
                    collector.begin_forward(mask)
                    run_block(block, run.hidden[k], call, run.device)
            collector.all_reduce(run.world)
            hessians = collector.hessians()
            for half, key in enumerate(("attention", "mlp")):
                Hinv = inverse_hessian(hessians.pop(key), self.config.percdamp)
                readers = halves[half]
                R, losses = learn_residual_rotation(
                    [([r.weight.detach() for r in readers], Hinv)],
                    steps=self.config.rotation_steps,
                    objective=self.config.rotation_objective,
                    pattern=_pattern(self.config),
                )
                del Hinv
                with torch.no_grad():
                    for reader in readers:
                        reader.weight.copy_(_rotate_inputs(reader.weight, R))
                        reader.register_forward_pre_hook(_input_rotation(R.to(reader.weight.device)))
                run.prune.report.rotation_losses[f"{index}.{key}"] = [losses[0], losses[-1]]
            run.tidy()


def layer_readers(block: nn.Module, index: int) -> tuple[tuple[nn.Linear, ...], tuple[nn.Linear, ...]]:
    """The Linears that read the attention input (q/k/v) and the MLP input (gate/up) of ``block``."""
    attention, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    halves = (
        tuple(getattr(attention, n) for n in ("q_proj", "k_proj", "v_proj") if hasattr(attention, n)),
        tuple(getattr(mlp, n) for n in ("gate_proj", "up_proj") if hasattr(mlp, n)),
    )
    if any(len(h) < 2 or not all(isinstance(m, nn.Linear) for m in h) for h in halves):
        raise RotationError(
            f"rotation='layer' needs self_attn.q_proj/k_proj/v_proj and mlp.gate_proj/up_proj as nn.Linear; block "
            f"{index} has other parts. Use rotation='heads' or rotation='none'."
        )
    return halves  # type: ignore[return-value]


def _input_rotation(R: torch.Tensor) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]:
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        return ((x.float() @ R).to(x.dtype), *args[1:])

    return hook
