import pytest
import torch
from torch import nn

import rose_hf.pruning as pruning_module
import rose_hf.runtime as runtime_module
import rose_hf.steps as steps_module
from rose_hf import RoseConfig, RosePruner
from rose_hf.collector import HessianCollector
from rose_hf.modeling import find_blocks, weight_matrix
from rose_hf.sparsegpt import sparsegpt_prune
from zoo import ZOO, build, calibration


def _untouched(model: nn.Module) -> dict[str, torch.Tensor]:
    keep = {"embed": model.get_input_embeddings().weight.detach().clone()}
    head = model.get_output_embeddings()
    if head is not None:
        keep["head"] = head.weight.detach().clone()
    return keep


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_end_to_end_unstructured(name):
    model = build(name)
    before = _untouched(model)
    report = RosePruner(model, RoseConfig(sparsity=0.6, blocksize=32)).prune(calibration(), progress=False)
    assert report.modules and report.num_tokens == 6 * 24
    for module in report.modules:
        assert abs(module.sparsity - 0.6) <= 0.005, module
        assert module.relative_error == module.relative_error and module.relative_error < 1.0
    assert torch.isfinite(model(calibration(2)).logits).all()
    after = _untouched(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_end_to_end_2_4(name):
    model = build(name)
    report = RosePruner(model, RoseConfig(pattern="2:4", blocksize=32, reorder="always")).prune(
        calibration(), progress=False
    )
    modules = dict(model.named_modules())
    for entry in report.modules:
        W = weight_matrix(modules[entry.name])
        zeros = (W == 0).reshape(W.shape[0], -1, 4).sum(dim=2)
        assert (zeros >= 2).all(), entry.name
    assert report.reordered_count == len(report.modules)
    assert torch.isfinite(model(calibration(2)).logits).all()


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3"])
def test_pruning_draws_no_random_numbers_whatever_the_seed(name):
    """RoseConfig.seed only picks calibration windows (test_cli checks that); pruning the same tokens
    gives the same bits whatever the seed and whatever state torch's global generator is in."""
    states = []
    for seed in (5, 6):
        model = build(name, seed=1)
        torch.manual_seed(seed * 1000)  # a pruner that drew random numbers would now differ
        RosePruner(model, RoseConfig(sparsity=0.7, blocksize=32, seed=seed)).prune(calibration(), progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_baselines_run_through_the_same_pipeline(method):
    model = build("llama")
    calib = None if method == "magnitude" else calibration()
    report = RosePruner(model, RoseConfig(sparsity=0.5, method=method)).prune(calib, progress=False)
    assert {m.method for m in report.modules} == {method}
    assert all(abs(m.sparsity - 0.5) <= 0.005 for m in report.modules)
    assert report.reordered_count == 0


def test_propagation_uses_the_pruned_block_outputs():
    """Block 1 must be pruned with the Hessian of what the *pruned* block 0 outputs."""
    model = build("llama")
    dense_q1 = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    calib = calibration()
    RosePruner(model, RoseConfig(sparsity=0.6, method="sparsegpt", blocksize=16)).prune(calib, progress=False)
    q1 = model.model.layers[1].self_attn.q_proj
    with torch.no_grad(), HessianCollector({"q1": q1}) as collector:
        for row in calib:
            collector.begin_forward(None)
            model(row.unsqueeze(0))
    want = sparsegpt_prune(dense_q1, collector.hessians()["q1"], 0.6, blocksize=16).weight
    torch.testing.assert_close(q1.weight.detach(), want, rtol=1e-3, atol=1e-4)


def test_attention_mask_padding_is_excluded_from_token_count():
    model = build("llama")
    ids = calibration(2, seqlen=12)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    report = RosePruner(model, RoseConfig(sparsity=0.5)).prune(
        [{"input_ids": ids, "attention_mask": mask}], progress=False
    )
    assert report.num_tokens == 20


def test_hooks_and_stubs_are_gone_after_a_failed_prune(monkeypatch):
    model = build("llama")

    def explode(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(pruning_module, "prune_matrix", explode)
    model.train()
    with pytest.raises(RuntimeError, match="simulated failure"):
        RosePruner(model, RoseConfig()).prune(calibration(), progress=False)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all("forward" not in block.__dict__ for block in find_blocks(model)[1])
    assert model.training  # the caller's mode is restored


def test_bad_inputs_raise_clear_errors():
    model = build("llama")
    with pytest.raises(ValueError, match="needs calibration data"):
        RosePruner(model, RoseConfig()).prune(None)
    with pytest.raises(ValueError, match="calibration data is empty"):
        RosePruner(model, RoseConfig()).prune([])
    with pytest.raises(ValueError, match="no 'input_ids'"):
        RosePruner(model, RoseConfig()).prune([{"ids": torch.ones(1, 4, dtype=torch.long)}])
    with pytest.raises(TypeError, match="config must be a RoseConfig"):
        RosePruner(model, {"sparsity": 0.5})  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            RosePruner(model, RoseConfig(device="cuda"))


def test_report_serialises():
    model = build("llama")
    report = RosePruner(model, RoseConfig(sparsity=0.5, reorder="always")).prune(calibration(), progress=False)
    data = report.to_dict()
    assert data["reordered_count"] == len(report.modules) == 14
    assert abs(data["overall_sparsity"] - 0.5) < 0.005
    assert "14 modules" in report.summary()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cpu_model, gpu_model = build("llama"), build("llama")
    RosePruner(cpu_model, RoseConfig(sparsity=0.6, device="cpu")).prune(calibration(), progress=False)
    RosePruner(gpu_model, RoseConfig(sparsity=0.6, device="cuda")).prune(calibration(), progress=False)
    for (name, a), b in zip(cpu_model.state_dict().items(), gpu_model.state_dict().values()):
        assert b.device.type == "cpu", name  # blocks go back where they were
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_observer_sees_every_module_with_its_hessian():
    seen = {}
    model = build("llama")
    RosePruner(
        model, RoseConfig(sparsity=0.5), observer=lambda name, W, H: seen.setdefault(name, (W.shape, H.shape))
    ).prune(calibration(), progress=False)
    assert len(seen) == 14
    assert all(h == (w[1], w[1]) for w, h in seen.values())


@pytest.mark.parametrize("method", ["rose", "sparsegpt"])
def test_dense_objective_matches_layer_objective_in_block_0_and_corrects_later(method):
    calib = calibration()
    results = {}
    for objective in ("layer", "dense"):
        model = build("llama")
        report = RosePruner(
            model,
            RoseConfig(sparsity=0.6, blocksize=32, method=method, objective=objective, refine="none", rotation="none"),
        ).prune(calib, progress=False)
        assert all(abs(m.sparsity - 0.6) < 0.01 for m in report.modules)
        results[objective] = {n: t.detach().clone() for n, t in model.named_parameters()}
    layer, dense = results["layer"], results["dense"]
    block0 = [n for n in layer if n.startswith("model.layers.0.")]
    later = [n for n in layer if n.startswith("model.layers.1.") and n.endswith("proj.weight")]
    assert block0 and all(torch.equal(layer[n], dense[n]) for n in block0)  # same inputs: same result
    assert later and any(not torch.equal(layer[n], dense[n]) for n in later)


def test_dense_objective_needs_a_reconstructing_method():
    with pytest.raises(ValueError, match="objective='dense' needs a reconstructing method"):
        RoseConfig(method="wanda", objective="dense")
    with pytest.raises(ValueError, match="objective"):
        RoseConfig(objective="global")
    with pytest.raises(ValueError, match="correction_damp=-1.0 must be a positive number"):
        RoseConfig(objective="dense", correction_damp=-1.0)
    with pytest.raises(ValueError, match="correction_damp=1.0 only applies to objective='dense'"):
        RoseConfig(correction_damp=1.0)


def test_calibration_stops_after_the_last_input_and_the_last_block_is_not_propagated():
    model = build("llama")
    _, blocks = find_blocks(model)
    runs = [0] * len(blocks)
    for index, block in enumerate(blocks):
        block.mlp.down_proj.register_forward_hook(lambda *_, i=index: runs.__setitem__(i, runs[i] + 1))
    RosePruner(model, RoseConfig(sparsity=0.5, blocksize=32)).prune(calibration(4), progress=False)
    # Per block: the first calibration forward runs to the end (it learns the call order), the other
    # three stop before down_proj, and propagation runs all four, except after the last block.
    assert runs == [1 + 4] * (len(blocks) - 1) + [1]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_stopping_calibration_early_changes_no_weight(name, monkeypatch):
    pruned = []
    for stop_early in (True, False):
        if not stop_early:

            class RunToTheEnd(HessianCollector):
                def __init__(self, modules, stop_early=False):  # type: ignore[no-untyped-def]
                    super().__init__(modules, stop_early=False)

            monkeypatch.setattr(steps_module, "HessianCollector", RunToTheEnd)
        model = build(name)
        RosePruner(model, RoseConfig(sparsity=0.6, blocksize=32)).prune(calibration(), progress=False)
        pruned.append(model.state_dict())
    assert all(torch.equal(pruned[0][key], pruned[1][key]) for key in pruned[0])


@pytest.mark.parametrize("config", [{}, {"objective": "dense"}])
def test_activations_on_disk_give_the_same_weights(tmp_path, config):
    memory, disk = build("llama"), build("llama")
    RosePruner(memory, RoseConfig(blocksize=32, **config)).prune(calibration(), progress=False)
    RosePruner(disk, RoseConfig(blocksize=32, **config), activations="disk", scratch_dir=tmp_path).prune(
        calibration(), progress=False
    )
    expected = memory.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in disk.state_dict().items())
    assert list(tmp_path.iterdir()) == []  # the scratch folder is gone


def test_activations_place_is_validated_up_front():
    with pytest.raises(ValueError, match="activations='cpu'"):
        RosePruner(build("llama"), RoseConfig(), activations="cpu")


_MMAP_PROBE = """
import ctypes, ctypes.util
from rose_hf.runtime import fix_mmap_threshold
libc = ctypes.CDLL(ctypes.util.find_library("c"))
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
def mapped(size):  # whether a block of this size gets its own mapping (hblks counts them)
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    after = libc.mallinfo2().hblks
    libc.free(ctypes.c_void_p(block))
    return after - before
print(fix_mmap_threshold(16 << 20), mapped(4 << 20), fix_mmap_threshold(1 << 20), mapped(4 << 20))
"""


@pytest.mark.slow
def test_fix_mmap_threshold_checks_its_value_and_moves_the_threshold_in_its_own_process():
    import subprocess
    import sys

    with pytest.raises(ValueError, match="mmap_threshold=0"):
        runtime_module.fix_mmap_threshold(0)
    if runtime_module._libc_function("mallopt") is None or runtime_module._libc_function("mallinfo2") is None:
        pytest.skip("needs glibc (mallopt, mallinfo2)")
    done = subprocess.run([sys.executable, "-c", _MMAP_PROBE], capture_output=True, text=True, check=True)
    # A 4 MiB block comes from the heap under a 16 MiB threshold and is its own mapping under 1 MiB.
    assert done.stdout.split() == ["True", "0", "True", "1"]
