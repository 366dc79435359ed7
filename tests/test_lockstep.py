"""true_sequential: forwards side by side (rose_hf.lockstep) against a plain whole-model reference."""

import warnings

import pytest
import torch

from rose_hf import RoseConfig, RosePruner
from rose_hf.collector import HessianCollector
from rose_hf.lockstep import Forwards, Round, decide
from rose_hf.modeling import find_blocks, target_modules, weight_matrix, write_weight
from rose_hf.pruning import prune_matrix, refiners_for
from rose_hf.sparsegpt import sparsegpt_prune
from zoo import ZOO, build, calibration


def _reference(model, config, batches):
    """true_sequential by definition: for each module in the order the model calls them, whole-model
    forwards of every batch (everything called before it already pruned) give its Hessian."""
    path, blocks = find_blocks(model)
    modules = {}
    for index, block in enumerate(blocks):
        modules.update(target_modules(block, f"{path}.{index}", config.targets, config.ignore))
    order = []
    hooks = [
        module.register_forward_pre_hook(lambda _m, _a, n=name: order.append(n) if n not in order else None)
        for name, module in modules.items()
    ]
    with torch.no_grad():
        model(batches[0]["input_ids"])
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        for name in order:
            with HessianCollector({name: modules[name]}) as collector:
                for batch in batches:
                    collector.begin_forward(batch.get("attention_mask"))
                    model(**batch)
            dense, H = weight_matrix(modules[name]).detach().clone(), collector.hessians()[name]
            W, _ = prune_matrix(dense, H, config)
            for refine in refiners_for(config):  # the default's ADMM too
                W = refine(name, dense, W, H)
            write_weight(modules[name], W)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_true_sequential_matches_the_definition_bitwise(name):
    config = RoseConfig(sparsity=0.6, blocksize=16, true_sequential=True, rotation="none")  # the definition's
    batches = [{"input_ids": row.unsqueeze(0)} for row in calibration()]
    if name == "llama":  # padding: each paused forward keeps its own token mask
        mask = torch.ones(1, 24, dtype=torch.long)
        mask[0, :5] = 0
        batches[2]["attention_mask"] = mask
    pruned, reference = build(name), build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback on any supported architecture
        RosePruner(pruned, config).prune(batches, progress=False)
    _reference(reference, config, batches)
    expected = reference.state_dict()
    for key, value in pruned.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_true_sequential_runs_one_forward_per_block_and_changes_later_modules():
    batches = calibration(4)
    counts = []
    models = {}
    for sequential in (False, True):
        model = build("llama")
        _, blocks = find_blocks(model)
        runs = [0] * len(blocks)
        for index, block in enumerate(blocks):
            block.mlp.down_proj.register_forward_hook(lambda *_, i=index, r=runs: r.__setitem__(i, r[i] + 1))
        config = RoseConfig(sparsity=0.5, blocksize=32, true_sequential=sequential, rotation="none")
        RosePruner(model, config).prune(batches, progress=False)
        counts.append(runs)
        models[sequential] = model.model.layers[0]
    assert counts == [[1 + 4, 1], [4, 4]]  # two-pass: calibrate (stopping early) + propagate; lockstep: one
    two_pass, lockstep = models[False], models[True]
    # q/k/v read the block's input either way; o_proj reads what the pruned q/k/v produce.
    assert torch.equal(two_pass.self_attn.q_proj.weight, lockstep.self_attn.q_proj.weight)
    assert not torch.equal(two_pass.self_attn.o_proj.weight, lockstep.self_attn.o_proj.weight)


def _q1_from_pruned_block0(model, dense_q1, batches):
    q1 = model.model.layers[1].self_attn.q_proj
    with torch.no_grad(), HessianCollector({"q1": q1}) as collector:
        for ids in batches:
            collector.begin_forward(None)
            model(ids)
    return sparsegpt_prune(dense_q1, collector.hessians()["q1"], 0.5, blocksize=32).weight


def test_batches_that_take_different_paths_fall_back_and_still_propagate():
    model = build("llama")
    mlp = model.model.layers[0].mlp
    plain = mlp.forward

    def routed(x):  # short inputs skip gate_proj, as a router might
        return plain(x) if x.shape[1] > 16 else mlp.down_proj(mlp.up_proj(x))

    mlp.forward = routed
    dense_q1 = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    batches = [calibration(1, seqlen=24)[:1], calibration(1, seqlen=12, seed=1)[:1], calibration(1, seqlen=24, seed=2)]
    config = RoseConfig(sparsity=0.5, blocksize=32, method="sparsegpt", true_sequential=True)
    with pytest.warns(UserWarning, match=r"block 0: true_sequential stopped because batches wait at different modules"):
        report = RosePruner(model, config).prune(batches, progress=False)
    assert len(report.modules) == 14 and all(abs(m.sparsity - 0.5) < 0.01 for m in report.modules)
    # Block 1 was calibrated on what the fully pruned block 0 outputs.
    want = _q1_from_pruned_block0(model, dense_q1, [b for b in batches])
    torch.testing.assert_close(model.model.layers[1].self_attn.q_proj.weight.detach(), want, rtol=1e-3, atol=1e-4)


def test_a_module_called_twice_falls_back_with_a_warning():
    model = build("llama")
    mlp = model.model.layers[0].mlp
    plain = mlp.forward
    mlp.forward = lambda x: plain(x) + mlp.down_proj(torch.zeros_like(mlp.up_proj(x)))
    config = RoseConfig(sparsity=0.5, blocksize=32, true_sequential=True)
    with pytest.warns(UserWarning) as caught:
        RosePruner(model, config).prune(calibration(3), progress=False)
    texts = [str(w.message) for w in caught]
    assert any("up_proj is called more than once per forward" in t for t in texts), texts
    assert any("got inputs after being pruned" in t for t in texts), texts
    assert {w.filename for w in caught} == {__file__}  # each warning points at the caller's line


def test_a_failure_inside_a_paused_forward_leaves_no_hook(monkeypatch):
    import rose_hf.pruning as pruning_module

    model = build("llama")
    calls = []

    def explode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        return prune_matrix(*args, **kwargs)

    monkeypatch.setattr(pruning_module, "prune_matrix", explode)
    with pytest.raises(RuntimeError, match="simulated failure"):
        RosePruner(model, RoseConfig(sparsity=0.5, true_sequential=True)).prune(calibration(3), progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.isfinite(model(calibration(1)).logits).all()


def test_activations_on_disk_give_the_same_weights_in_lockstep(tmp_path):
    memory, disk = build("llama"), build("llama")
    config = RoseConfig(blocksize=32, true_sequential=True)
    RosePruner(memory, config).prune(calibration(), progress=False)
    RosePruner(disk, config, activations="disk", scratch_dir=tmp_path).prune(calibration(), progress=False)
    expected = memory.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in disk.state_dict().items())


def test_decide():
    both = [Round(frozenset({"a"}), 2, 0), Round(frozenset({"a"}), 1, 0)]
    assert decide(both, set()) == ("prune", "a")
    assert decide([*both, Round(frozenset(), 0, 0)], set()) == ("prune", "a")  # a rank with nothing left
    assert decide([Round(frozenset(), 0, 3)], {"a"}) == ("done", "")
    assert decide(both, {"a"}) == ("diverge", "a is called more than once per forward")
    assert decide([Round(frozenset({"a", "b"}), 2, 0)], set())[1] == "batches wait at different modules (a, b)"
    assert decide([Round(frozenset({"b"}), 1, 1)], set())[1] == "some batches finished without calling b"


def test_lockstep_pauses_every_forward_at_each_name_and_collects_results():
    trail = []

    def forward(k):
        def run():
            trail.append(("start", k))
            runner.pause("x")
            trail.append(("x", k))
            runner.pause("y")
            return k * 10

        return run

    resumed = []
    runner = Forwards([forward(0), forward(1)], resumed.append)
    assert runner.step() == Round(frozenset({"x"}), 2, 0)
    assert trail == [("start", 0), ("start", 1)]
    assert runner.step() == Round(frozenset({"y"}), 2, 0)
    assert runner.step() == Round(frozenset(), 0, 2)
    assert runner.results == [0, 10] and resumed == [0, 1] * 3
    runner.pause("outside")  # not inside a forward: nothing happens


def test_lockstep_finish_and_close():
    held = []

    def run():
        held.append(torch.zeros(3))
        runner.pause("a")
        runner.pause("b")
        return "end"

    runner = Forwards([run, run], lambda k: None)
    runner.step()
    runner.finish()  # no more pauses
    assert runner.results == ["end", "end"]
    closing = Forwards([run], lambda k: None)
    runner = closing
    closing.step()
    closing.close()
    assert closing.step() == Round(frozenset(), 0, 0)


def test_a_failure_in_one_forward_ends_the_others_and_removes_the_hooks():
    model = build("llama")
    mlp = model.model.layers[1].mlp
    plain = mlp.forward
    seen = []

    def failing(x):
        seen.append(1)
        if len(seen) == 2:  # the second batch's forward fails while the first waits at a pause
            raise RuntimeError("forward failed")
        return plain(x)

    mlp.forward = failing
    with pytest.raises(RuntimeError, match="forward failed"):
        RosePruner(model, RoseConfig(sparsity=0.5, true_sequential=True)).prune(calibration(3), progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())
