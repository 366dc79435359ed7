import functools

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from rose_hf import hessian
from rose_hf.collector import HessianCollector


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
            collector.begin_forward(None)
            layer(x)
    X = torch.cat([x.reshape(-1, 5) for x in xs])
    torch.testing.assert_close(collector.hessians()["layer"], 2.0 / X.shape[0] * X.T @ X)
    assert collector.token_count("layer") == 42


def test_padding_tokens_are_excluded():
    layer = nn.Linear(4, 2)
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with HessianCollector({"layer": layer}) as collector:
        collector.begin_forward(mask)
        layer(x)
    X = x[mask.bool()]
    torch.testing.assert_close(collector.hessians()["layer"], 2.0 / 8 * X.T @ X)
    assert collector.token_count("layer") == 8


def test_modules_reading_one_input_share_one_accumulator():
    model = Shared()
    modules = {"q": model.q, "k": model.k, "out": model.out}
    with HessianCollector(modules) as collector:
        for seed in range(2):
            collector.begin_forward(None)
            model(torch.randn(3, 6, generator=torch.Generator().manual_seed(seed)))
    H = collector.hessians()
    assert H["q"] is H["k"] and collector.shared_with("k") == "q"
    assert H["out"] is not H["q"] and collector.shared_with("out") is None
    assert not torch.allclose(H["out"], H["q"])


def test_hooks_are_removed_even_when_the_forward_raises():
    layer = nn.Linear(3, 3)
    with pytest.raises(RuntimeError, match="boom"), HessianCollector({"layer": layer}):
        assert len(layer._forward_pre_hooks) == 1
        raise RuntimeError("boom")
    assert len(layer._forward_pre_hooks) == 0


def test_conv1d_input_is_collected():
    conv = Conv1D(4, 3)  # nf=4 outputs, nx=3 inputs
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(1))
    with HessianCollector({"c": conv}) as collector:
        collector.begin_forward(None)
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
            collector.begin_forward(mask)
            with collector.reference_pass():
                model(xd)
            model(x)
    X = torch.cat([x[mask.bool()] for x in pruned])
    Xd = torch.cat([x[mask.bool()] for x in dense])
    C, H = collector.crosses(), collector.hessians()
    torch.testing.assert_close(C["q"], 2.0 / X.shape[0] * X.T @ (Xd - X))
    torch.testing.assert_close(H["q"], 2.0 / X.shape[0] * X.T @ X)  # the reference pass added nothing
    assert C["k"] is C["q"]  # shared like the Hessian
    assert C["out"].abs().max() > 0


def test_cross_term_is_exactly_zero_where_the_inputs_agree():
    model = Shared()
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(4)) * 1e3  # large, like outlier channels
    with HessianCollector({"q": model.q, "out": model.out}) as collector:
        collector.begin_forward(None)
        with collector.reference_pass():
            model(x)
        model(x)
    assert all(not C.any() for C in collector.crosses().values())


def test_no_cross_term_without_a_reference_pass():
    layer = nn.Linear(4, 2)
    with HessianCollector({"layer": layer}) as collector:
        collector.begin_forward(None)
        layer(torch.randn(3, 4))
    assert collector.crosses() == {} and "layer" in collector.hessians()


def test_gram_update_fills_the_upper_triangle_in_panels(monkeypatch):
    monkeypatch.setattr(hessian, "GRAM_PANEL", 4)  # 10 columns: panels of 4, 4 and 2
    X = torch.randn(7, 10, generator=torch.Generator().manual_seed(1))
    total = torch.zeros(10, 10)
    hessian.gram_update(total, X)
    hessian.gram_update(total, X)
    full = 2 * X.T @ X
    torch.testing.assert_close(total.triu(), full.triu())
    assert not total[4:, :4].any() and not total[8:, :8].any()  # below the panels: never computed
    H = hessian.symmetrize(total, 0.5)
    torch.testing.assert_close(H, X.T @ X)
    assert torch.equal(H, H.T)


class Chain(nn.Module):
    """a -> b -> c, with a counter of how often c's forward ran."""

    def __init__(self, repeat_b: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.repeat_b = repeat_b
        self.c_runs = 0
        self.c.register_forward_hook(lambda *_: setattr(self, "c_runs", self.c_runs + 1))

    def forward(self, x):
        y = self.b(self.a(x))
        if self.repeat_b:
            y = self.b(y)
        return self.c(y)


@pytest.mark.parametrize("repeat_b", [False, True])
def test_stop_early_skips_the_tail_and_gives_the_same_hessians(repeat_b):
    inputs = [torch.randn(3, 4, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    results, runs = [], []
    for stop_early in (False, True):
        model = Chain(repeat_b)
        torch.manual_seed(0)
        model.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
        with torch.no_grad(), HessianCollector({"a": model.a, "b": model.b, "c": model.c}, stop_early) as collector:
            for x in inputs:
                collector.begin_forward(None)
                collector.run(functools.partial(model, x))
        results.append(collector.hessians())
        runs.append(model.c_runs)
    for name in ("a", "b", "c"):
        assert torch.equal(results[0][name], results[1][name]), name
    # Only the first forward (which learns the call order) runs c; a module called twice per forward
    # (b) makes every forward run to the end, so that none of its inputs is missed.
    assert runs == ([4, 4] if repeat_b else [4, 1])


class _Routed(nn.Module):
    """``expert`` sees only the tokens a router sends it (every other row here), as in a MoE block."""

    def __init__(self) -> None:
        super().__init__()
        self.expert = nn.Linear(4, 4)

    def forward(self, x):
        return self.expert(x.reshape(-1, 4)[::2])


def test_a_module_that_sees_a_subset_of_tokens_refuses_padding_it_cannot_place():
    model = _Routed()
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    with HessianCollector({"expert": model.expert}) as collector:
        collector.begin_forward(torch.ones(2, 5))  # no padding: every row is a real token
        model(x)
        assert collector.token_count("expert") == 5
        collector.begin_forward(torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]))
        with pytest.raises(ValueError, match="expert got 5 token rows but the attention mask covers 10 tokens"):
            model(x)
    assert not model.expert._forward_pre_hooks
