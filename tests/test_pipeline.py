"""The pipeline's plug-in points, each shown by a small test double: a model transform before
pruning, a refinement after each module's method, a per-module sparsity plan, a home."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from rose_hf import RoseConfig, RosePruner
from rose_hf.distributed import World
from rose_hf.homes import LoadedHome
from rose_hf.pipeline import Extensions, prune_model
from rose_hf.report import PruneReport, Stopwatch
from rose_hf.shards import CheckpointReader
from rose_hf.streaming import prune_checkpoint
from zoo import build, calibration


class ScaleUpProjections:
    """A transform double: doubles every block's ``mlp.up_proj`` weight before the block is pruned."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def before_capture(self, model, blocks):
        self.events.append("before_capture")

    def on_block(self, index, block):
        assert not block.mlp.up_proj.weight.is_meta  # the block is loaded (also when streamed)
        with torch.no_grad():
            block.mlp.up_proj.weight.mul_(2.0)
        self.events.append(f"block {index}")


def _scaled_by_hand(model):
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.up_proj.weight.mul_(2.0)
    return model


def test_a_transform_runs_before_each_block_is_pruned_in_memory_and_streamed(tmp_path):
    config = RoseConfig(sparsity=0.6, blocksize=32)
    expected = _scaled_by_hand(build("llama"))
    RosePruner(expected, config).prune(calibration(), progress=False)

    transform = ScaleUpProjections()
    model = build("llama")
    RosePruner(model, config, transforms=[transform]).prune(calibration(), progress=False)
    assert transform.events == ["before_capture", "block 0", "block 1"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in expected.state_dict().items())

    build("llama").save_pretrained(tmp_path / "source")
    prune_checkpoint(
        tmp_path / "source", tmp_path / "out", config, calibration(), progress=False, extensions=Extensions([transform])
    )
    reader = CheckpointReader(tmp_path / "out")
    assert all(torch.equal(reader.get(k), v) for k, v in expected.state_dict().items() if k in reader.files)


def test_a_refiner_sees_each_module_and_its_result_is_what_is_written_and_reported():
    seen = []

    def keep_dense(name, W, W_pruned, H):
        """A refiner double that throws the method's work away: the written weights must be W."""
        assert H is not None and H.shape == (W.shape[1], W.shape[1])
        seen.append((name, float((W_pruned == 0).float().mean())))
        return W.clone()

    model = build("llama")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    config = RoseConfig(sparsity=0.6, blocksize=32, rotation="none")  # no rotation: the dense weights stay as built
    report = RosePruner(model, config, refiners=[keep_dense]).prune(calibration(), progress=False)
    assert len(seen) == len(report.modules) == 14
    assert all(abs(sparsity - 0.6) < 0.01 for _, sparsity in seen)  # it got the method's pruned weights
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())
    assert all(m.sparsity == 0.0 and m.error == 0.0 for m in report.modules)


def test_identity_refiner_changes_no_bit():
    plain, refined = build("llama"), build("llama")
    RosePruner(plain, RoseConfig(blocksize=32)).prune(calibration(), progress=False)
    RosePruner(refined, RoseConfig(blocksize=32), refiners=[lambda name, W, Wp, H: Wp]).prune(
        calibration(), progress=False
    )
    assert all(torch.equal(v, refined.state_dict()[k]) for k, v in plain.state_dict().items())


@pytest.mark.parametrize("true_sequential", [False, True])
def test_blocks_with_no_target_module_are_passed_through_untouched(true_sequential):
    """Targets in a later block only: the earlier blocks only carry the inputs forward."""
    model, reference = build("llama"), build("llama")
    config = RoseConfig(sparsity=0.5, blocksize=32, targets=[r"layers\.1\."], true_sequential=true_sequential)
    report = RosePruner(model, config).prune(calibration(), progress=False)
    assert report.modules and all(m.name.startswith("model.layers.1.") for m in report.modules)
    assert all(abs(m.sparsity - 0.5) <= 0.01 for m in report.modules)
    state, dense = model.state_dict(), reference.state_dict()
    assert all(torch.equal(state[k], dense[k]) for k in state if not k.startswith("model.layers.1."))


def attention_light(model, modules, config, batches):
    """A plan double: attention at 0.3, the MLP at 0.7."""
    return {name: 0.3 if ".self_attn." in name else 0.7 for name in modules}


def test_a_sparsity_plan_sets_each_modules_amount():
    report = RosePruner(build("llama"), RoseConfig(blocksize=32), plan=attention_light).prune(
        calibration(), progress=False
    )
    for module in report.modules:
        want = 0.3 if ".self_attn." in module.name else 0.7
        assert abs(module.sparsity - want) <= 0.01, module


@pytest.mark.parametrize(
    ("config", "plan", "message"),
    [
        (RoseConfig(pattern="2:4"), attention_light, "does not apply to pattern='2:4'"),
        (RoseConfig(), lambda model, modules, config, batches: {"model.nowhere": 0.5}, "not target modules"),
        (RoseConfig(), lambda model, modules, config, batches: dict.fromkeys(modules, 1.0), r"outside \[0, 1\)"),
    ],
)
def test_a_bad_plan_is_refused_before_any_weight_changes(config, plan, message):
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        RosePruner(model, config, plan=plan).prune(calibration(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class RecordingHome(LoadedHome):
    """A home double: where the pipeline asks a block to be, in order."""

    def __init__(self, device):
        super().__init__(device)
        self.events = []

    def before_capture(self, batches):
        self.events.append("before_capture")

    def after_capture(self):
        self.events.append("after_capture")

    def enter(self, index, block):
        self.events.append(f"enter {index}")
        super().enter(index, block)

    def leave(self, index, block):
        self.events.append(f"leave {index}")
        super().leave(index, block)


@pytest.mark.parametrize(("method", "capture"), [("rose", True), ("magnitude", False)])
def test_the_loop_asks_the_home_in_order(method, capture):
    home = RecordingHome(torch.device("cpu"))
    calib = calibration() if capture else None
    device, world = torch.device("cpu"), World()
    prune_model(build("llama"), RoseConfig(method=method), calib, home, device=device, world=world, progress=False)
    blocks = ["enter 0", "leave 0", "enter 1", "leave 1"]
    assert home.events == (["before_capture", "after_capture"] if capture else []) + blocks


def test_a_meta_model_cannot_be_saved(tmp_path):
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(build("llama").config)
    pruner = RosePruner(model, RoseConfig(method="magnitude"))
    pruner.report = PruneReport()  # as if pruned: the check is about the weights
    with pytest.raises(ValueError, match="meta device .* rose_hf.streaming.prune_checkpoint"):
        pruner.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_single_process_world_passes_values_through():
    world, tensor = World(), torch.arange(3.0)
    assert world.all_reduce_sum(tensor) is tensor and torch.equal(tensor, torch.arange(3.0))
    assert world.broadcast_tensor(tensor, 0) is tensor and world.broadcast_object({"a": 1}, 0) == {"a": 1}
    assert world.gather_objects("x") == ["x"] and world.lead and world.share([1, 2]) == [1, 2]


def test_stopwatch_phases_nest_exclusively(monkeypatch):
    import rose_hf.report as report_module

    clock = iter([0.0, 1.0, 3.0, 10.0, 10.0, 14.0])
    monkeypatch.setattr(report_module.time, "perf_counter", lambda: next(clock))
    report = PruneReport()
    stopwatch = Stopwatch(report)
    with stopwatch.phase("calibrate"):  # 0 -> 10
        with stopwatch.phase("prune"):  # 1 -> 3
            pass
    with stopwatch.phase("propagate"):  # 10 -> 14
        pass
    assert (report.calibrate_seconds, report.prune_seconds, report.propagate_seconds) == (8.0, 2.0, 4.0)
    with pytest.raises(ValueError, match="phase 'train' is not one of"):
        with stopwatch.phase("train"):
            pass


def test_progress_bars_follow_hf_hub_disable_progress_bars(monkeypatch, capsys):
    import rose_hf.pipeline

    RosePruner(build("llama"), RoseConfig(method="magnitude")).prune(None)
    assert "rose_hf magnitude" in capsys.readouterr().err
    # huggingface_hub's own switch, which reads HF_HUB_DISABLE_PROGRESS_BARS
    monkeypatch.setattr(rose_hf.pipeline, "are_progress_bars_disabled", lambda *a: True)
    RosePruner(build("llama"), RoseConfig(method="magnitude")).prune(None)
    assert "rose_hf magnitude" not in capsys.readouterr().err


def test_the_package_declares_its_type_hints():
    from importlib.resources import files

    assert files("rose_hf").joinpath("py.typed").is_file()


class SnapshotDenseBlock:
    """A ``BasisChange`` double listed after the config's own: keeps block 0 as the step will prune it
    (transformed, still dense) and changes nothing."""

    def __init__(self) -> None:
        self.block0: dict[str, torch.Tensor] = {}

    def before_capture(self, model, blocks):
        pass

    def reads(self, block, targets):
        return []

    def on_calibrated(self, index, block, targets, hessians):
        if index == 0:
            self.block0 = {k: v.clone() for k, v in block.state_dict().items()}


def _input_hessians(model, modules, ids):
    """``2/N XᵀX`` of each module's input over every token of ``ids``, by hand."""
    sums = {}

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            total, count = sums.get(name, (0, 0))
            sums[name] = (total + x.T @ x, count + x.shape[0])

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in modules]
    with torch.no_grad():
        for row in ids:
            model(row.unsqueeze(0))
    for handle in handles:
        handle.remove()
    return {name: (2 / count * total).float() for name, (total, count) in sums.items()}


@pytest.mark.parametrize("objective", ["layer", "dense"])
def test_basis_changes_reuse_the_steps_hessians_turned_with_the_weights(objective):
    """Heads rotation and channel permutation read the step's calibration and rebase it: every
    module of block 0 is pruned with the Hessian a fresh measurement of the changed block gives."""
    seen: dict[str, torch.Tensor] = {}

    def record(name, W, W_pruned, H):
        seen[name] = H.clone()
        return W_pruned

    snapshot = SnapshotDenseBlock()
    config = RoseConfig(
        pattern="2:4", blocksize=32, rotation="heads", channel_permutation=True, objective=objective, refine="none"
    )
    RosePruner(build("llama"), config, transforms=[snapshot], refiners=[record]).prune(calibration(), progress=False)
    assert snapshot.block0, "the double ran after the config's basis changes"

    changed = build("llama")
    changed.model.layers[0].load_state_dict(snapshot.block0)
    assert not torch.equal(
        changed.model.layers[0].self_attn.o_proj.weight, build("llama").model.layers[0].self_attn.o_proj.weight
    )
    names = [n for n in seen if n.startswith("model.layers.0.")]
    truth = _input_hessians(changed, names, calibration())
    for name in names:
        assert torch.allclose(seen[name], truth[name], rtol=1e-4, atol=1e-5 * truth[name].abs().max()), name


def test_block_hessians_rebase_turns_the_hessian_and_the_cross_term_of_that_module_only():
    from rose_hf.steps import BlockHessians

    a, b, c = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    H = {"a": torch.eye(3), "b": torch.full((3, 3), 2.0)}
    C = {"a": torch.arange(9.0).reshape(3, 3)}
    view = BlockHessians({"a": a, "b": b}, H, C)
    view.extra[c] = torch.ones(3, 3)
    flip = torch.tensor([2, 1, 0])
    view.rebase(a, lambda M: M[flip][:, flip])
    view.rebase(c, lambda M: 3 * M)
    assert torch.equal(H["a"], torch.eye(3)) and torch.equal(H["b"], torch.full((3, 3), 2.0))
    assert torch.equal(C["a"], torch.arange(9.0).reshape(3, 3).flip(0, 1))
    assert torch.equal(view.of(c), torch.full((3, 3), 3.0)) and view.has(c) and not view.has(torch.nn.Linear(1, 1))


def test_a_basis_change_without_calibration_is_refused_before_any_weight_changes():
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="method='magnitude' does not measure; use a calibrating method"):
        RosePruner(model, RoseConfig(sparsity=0.5, method="magnitude"), transforms=[SnapshotDenseBlock()]).prune(
            None, progress=False
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
