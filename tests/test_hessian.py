import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from rose_hf.hessian import HessianCollector


class Shared(nn.Module):
    """q and k read the same tensor; out reads a different one of the same shape."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.out(self.q(x) + self.k(x))


def test_hessian_is_two_over_n_xtx():
    layer = nn.Linear(5, 3)
    xs = [torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with HessianCollector({"layer": layer}) as collector:
        for x in xs:
            collector.set_token_mask(None)
            layer(x)
    X = torch.cat([x.reshape(-1, 5) for x in xs])
    torch.testing.assert_close(collector.hessians()["layer"], 2.0 / X.shape[0] * X.T @ X)
    assert collector.token_count("layer") == 42


def test_padding_tokens_are_excluded():
    layer = nn.Linear(4, 2)
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with HessianCollector({"layer": layer}) as collector:
        collector.set_token_mask(mask)
        layer(x)
    X = x[mask.bool()]
    torch.testing.assert_close(collector.hessians()["layer"], 2.0 / 8 * X.T @ X)
    assert collector.token_count("layer") == 8


def test_modules_reading_one_input_share_one_accumulator():
    model = Shared()
    modules = {"q": model.q, "k": model.k, "out": model.out}
    with HessianCollector(modules) as collector:
        for seed in range(2):
            collector.set_token_mask(None)
            model(torch.randn(3, 6, generator=torch.Generator().manual_seed(seed)))
    H = collector.hessians()
    assert H["q"] is H["k"] and collector.shared_with("k") == "q"
    assert H["out"] is not H["q"] and collector.shared_with("out") is None
    assert not torch.allclose(H["out"], H["q"])


def test_hooks_are_removed_even_when_the_forward_raises():
    layer = nn.Linear(3, 3)
    with pytest.raises(RuntimeError, match="boom"), HessianCollector({"layer": layer}):
        assert len(layer._forward_hooks) == 1
        raise RuntimeError("boom")
    assert len(layer._forward_hooks) == 0


def test_conv1d_input_is_collected():
    conv = Conv1D(4, 3)  # nf=4 outputs, nx=3 inputs
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(1))
    with HessianCollector({"c": conv}) as collector:
        collector.set_token_mask(None)
        conv(x)
    torch.testing.assert_close(collector.hessians()["c"], 2.0 / 10 * x.T @ x)


def test_reference_pass_gives_the_cross_term_with_the_dense_inputs():
    model = Shared()
    modules = {"q": model.q, "k": model.k, "out": model.out}
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pruned = [torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    dense = [torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(10 + s)) for s in range(2)]
    with HessianCollector(modules) as collector:
        for x, xd in zip(pruned, dense):
            collector.set_token_mask(mask)
            with collector.reference_pass():
                model(xd)
            model(x)
    X = torch.cat([x[mask.bool()] for x in pruned])
    Xd = torch.cat([x[mask.bool()] for x in dense])
    G, H = collector.crosses(), collector.hessians()
    torch.testing.assert_close(G["q"], 2.0 / X.shape[0] * X.T @ Xd)
    torch.testing.assert_close(H["q"], 2.0 / X.shape[0] * X.T @ X)  # the reference pass added nothing
    assert G["k"] is G["q"]  # shared like the Hessian
    assert not torch.allclose(G["out"], collector.hessians()["out"])


def test_no_cross_term_without_a_reference_pass():
    layer = nn.Linear(4, 2)
    with HessianCollector({"layer": layer}) as collector:
        collector.set_token_mask(None)
        layer(torch.randn(3, 4))
    assert collector.crosses() == {} and "layer" in collector.hessians()
