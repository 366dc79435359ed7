"""Head rotations (DenoiseRotator's R2): the math, and exactness on real attention modules."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import correlated_problem
from rose_hf.rotation import (
    dropped_share,
    entropy,
    fuse_head_rotations,
    head_blocks,
    head_rotation_loss,
    importance,
    learn_head_rotations,
    learn_residual_rotation,
    orthogonal,
    residual_rotation_loss,
    rotate_hessian,
    rotate_rows,
)
from rose_hf.sparsegpt import inverse_hessian_factor
from zoo import build, calibration


def random_rotations(kv_heads: int, head_dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return orthogonal(torch.randn(kv_heads, head_dim, head_dim, generator=g, dtype=torch.float64)).float()


def test_orthogonal_is_orthogonal_and_identity_at_identity():
    A = torch.randn(3, 7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Q = orthogonal(A)
    assert torch.allclose(Q.transpose(1, 2) @ Q, torch.eye(7, dtype=torch.float64).expand(3, 7, 7), atol=1e-12)
    assert torch.equal(orthogonal(torch.eye(5)), torch.eye(5))
    # The sign fix makes the map A -> Q invariant to scaling A's columns by positive numbers.
    assert torch.allclose(orthogonal(A * torch.rand(7, dtype=torch.float64).add(0.5)), Q, atol=1e-10)


def test_entropy_of_uniform_one_hot_and_zero_slices():
    S = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert entropy(S, 1).item() == pytest.approx(math.log(4), abs=1e-6)
    assert entropy(S[1:], 1).item() == 0.0


def test_importance_is_the_error_of_pruning_one_weight_alone():
    W, _, H = correlated_problem(3, 10, 64, seed=1)
    H = H.double()
    Hinv = torch.linalg.inv(H)
    S = importance(W.double(), Hinv)
    for i, j in ((0, 2), (1, 7), (2, 9)):
        # min over d with d_j = -w_ij of d H d^T, by eliminating d_j and solving for the rest.
        rest = [k for k in range(10) if k != j]
        w = W[i, j].double()
        d_rest = torch.linalg.solve(H[rest][:, rest], -H[rest, j] * -w)
        d = torch.zeros(10, dtype=torch.float64)
        d[rest], d[j] = d_rest, -w
        assert S[i, j].item() == pytest.approx((d @ H @ d).item(), rel=1e-9)


def test_head_blocks_follow_repeat_kv():
    R = random_rotations(2, 3, seed=0)
    B = head_blocks(R, heads=4)
    for h in range(4):
        assert torch.equal(B[3 * h : 3 * h + 3, 3 * h : 3 * h + 3], R[h // 2])
    with pytest.raises(ValueError, match="heads=3 is not a multiple of kv_heads=2"):
        head_blocks(R, heads=3)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "mistral"])
def test_fused_rotations_keep_the_logits_and_rotate_o_proj_hessian(arch):
    """Qwen2's v_proj has a bias (randomised here, so it matters); Gemma 3's head_dim is not hidden/heads."""
    model = build(arch)
    config = model.config
    with torch.no_grad():
        for block in model.model.layers:
            if block.self_attn.v_proj.bias is not None:
                block.self_attn.v_proj.bias.normal_()
    ids = calibration()
    v_before = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    inputs = []
    hook = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        before = model(ids).logits
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    for index, block in enumerate(model.model.layers):
        attn = block.self_attn
        R = random_rotations(kv_heads, head_dim, seed=index)
        Wv, bv, Wo = fuse_head_rotations(attn.v_proj.weight, attn.v_proj.bias, attn.o_proj.weight, R, heads)
        with torch.no_grad():
            attn.v_proj.weight.copy_(Wv)
            attn.o_proj.weight.copy_(Wo)
            if bv is not None:
                attn.v_proj.bias.copy_(bv)
        if index == 0:
            R0 = R
    with torch.no_grad():
        after = model(ids).logits
    hook.remove()
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(model.model.layers[0].self_attn.v_proj.weight, v_before, atol=1e-2)
    Z0, Z1 = (z.reshape(-1, z.shape[-1]).double() for z in inputs)
    assert torch.allclose(rotate_hessian(Z0.T @ Z0, R0, heads), (Z1.T @ Z1).float(), atol=1e-3, rtol=1e-4)


def test_dropped_share_is_what_the_pattern_drops_over_the_total():
    S = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]])
    # 2:4: per group of four the two smallest: row 0 (1 + 2) + (0 + 1), row 1 (1 + 1) + (2 + 2).
    assert dropped_share(S, 0.5, 2, 4).item() == pytest.approx(10.0 / S.sum().item())
    # unstructured 25 %: the two smallest of each row of eight: row 0 0 + 1, row 1 1 + 1.
    assert dropped_share(S, 0.25).item() == pytest.approx(3.0 / S.sum().item())
    assert dropped_share(7.0 * S, 0.5, 2, 4).item() == pytest.approx(dropped_share(S, 0.5, 2, 4).item())
    assert dropped_share(torch.zeros(2, 4), 0.5, 2, 4).item() == 0.0
    with pytest.raises(ValueError, match="6 columns are not whole groups of m=4"):
        dropped_share(torch.ones(2, 6), 0.5, 2, 4)
    with pytest.raises(ValueError, match=r"objective='spread' is not one of \['entropy', 'dropped'\]"):
        head_rotation_loss(
            torch.ones(4, 4), torch.eye(4), torch.ones(4, 4), torch.eye(4), torch.eye(4)[None], 1, "spread"
        )


def test_the_dropped_loss_reads_o_proj_at_its_own_sparsity():
    g = torch.Generator().manual_seed(4)
    Wv, Wo = torch.randn(8, 12, generator=g), torch.randn(12, 8, generator=g)
    I12, I8, R = torch.eye(12), torch.eye(8), torch.eye(8)[None]
    Sv, So = importance(Wv, I12), importance(Wo, I8)
    both = head_rotation_loss(Wv, I12, Wo, I8, R, 1, "dropped", (0.25, 0, 0))
    apart = head_rotation_loss(Wv, I12, Wo, I8, R, 1, "dropped", (0.25, 0, 0), o_sparsity=0.75)
    assert both.item() == pytest.approx((dropped_share(Sv, 0.25) + dropped_share(So, 0.25)).item())
    assert apart.item() == pytest.approx((dropped_share(Sv, 0.25) + dropped_share(So, 0.75)).item())


def test_learned_rotations_lower_the_loss_deterministically():
    g = torch.Generator().manual_seed(3)
    kv_heads, heads, head_dim, hidden, tokens = 2, 4, 8, 24, 256
    # Importance spread by a hidden rotation of sparse rows: a rotation can concentrate it again.
    sparse = torch.randn(kv_heads, head_dim, hidden, generator=g) * (
        torch.rand(kv_heads, head_dim, hidden, generator=g) < 0.2
    )
    Wv = (random_rotations(kv_heads, head_dim, seed=9) @ sparse).reshape(kv_heads * head_dim, hidden)
    Wo = torch.randn(hidden, heads * head_dim, generator=g)
    Xv, Xo = torch.randn(tokens, hidden, generator=g), torch.randn(tokens, heads * head_dim, generator=g)
    inverse = []
    for X in (Xv, Xo):
        U, _, _ = inverse_hessian_factor(2 / tokens * X.T @ X, 0.01)
        inverse.append(U.T @ U)
    kept = [t.clone() for t in (Wv, Wo, *inverse)]
    R, losses = learn_head_rotations(Wv, inverse[0], Wo, inverse[1], kv_heads, heads, steps=60, lr=0.02)
    again, losses_again = learn_head_rotations(Wv, inverse[0], Wo, inverse[1], kv_heads, heads, steps=60, lr=0.02)
    assert torch.equal(R, again) and losses == losses_again
    assert losses[0] == pytest.approx(
        head_rotation_loss(Wv, inverse[0], Wo, inverse[1], torch.eye(head_dim).expand(kv_heads, -1, -1), heads).item()
    )
    assert losses[-1] < 0.9 * losses[0]
    assert torch.allclose(R.transpose(1, 2) @ R, torch.eye(head_dim).expand(kv_heads, -1, -1), atol=1e-5)
    # The "dropped" objective lowers the share of importance 2:4 drops, from the same start.
    eye = torch.eye(head_dim).expand(kv_heads, -1, -1)
    for pattern in ((0.5, 2, 4), (0.6, 0, 0)):
        Rd, dropped = learn_head_rotations(
            Wv, inverse[0], Wo, inverse[1], kv_heads, heads, steps=60, lr=0.02, objective="dropped", pattern=pattern
        )
        start = head_rotation_loss(Wv, inverse[0], Wo, inverse[1], eye, heads, "dropped", pattern)
        assert dropped[0] == pytest.approx(start.item()) and dropped[-1] < 0.9 * dropped[0], pattern
        assert torch.allclose(Rd.transpose(1, 2) @ Rd, eye, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(kept, (Wv, Wo, *inverse)))


def test_loss_from_diagonal_blocks_equals_the_full_rotation():
    g = torch.Generator().manual_seed(4)
    kv_heads, heads, head_dim, hidden = 2, 6, 4, 10
    Wv, Wo = torch.randn(kv_heads * head_dim, hidden, generator=g), torch.randn(hidden, heads * head_dim, generator=g)
    X = torch.randn(64, heads * head_dim, generator=g)
    Hinv_o = torch.linalg.inv(X.T @ X / 64 + 0.1 * torch.eye(heads * head_dim))
    Hinv_v = torch.rand(hidden, generator=g) + 0.5
    R = random_rotations(kv_heads, head_dim, seed=2)
    B = head_blocks(R, heads)
    So = importance(Wo @ B, B.T @ Hinv_o @ B)
    Sv = importance(torch.block_diag(*R).T @ Wv, Hinv_v)
    full = entropy(Sv, 1) + entropy(Sv, 0) + entropy(So, 1) + entropy(So, 0)
    assert head_rotation_loss(Wv, Hinv_v, Wo, Hinv_o, R, heads).item() == pytest.approx(full.item(), rel=1e-5)


def test_residual_loss_reads_the_inverse_hessian_in_the_rotated_basis():
    generator = torch.Generator().manual_seed(3)
    X = torch.randn(64, 12, generator=generator)
    H = X.T @ X / 64 + 0.1 * torch.eye(12)
    Ws = [torch.randn(5, 12, generator=generator), torch.randn(7, 12, generator=generator)]
    R = orthogonal(torch.randn(12, 12, generator=generator))
    Hinv_rotated = torch.linalg.inv(R.T @ H @ R)  # the Hessian of the rotated inputs X R, inverted
    expected = sum(
        entropy(importance(W @ R, Hinv_rotated), 1) + entropy(importance(W @ R, Hinv_rotated), 0) for W in Ws
    )
    got = residual_rotation_loss([(Ws, torch.linalg.inv(H))], R)
    assert torch.allclose(got, expected, rtol=1e-4)


def test_the_residual_loss_can_be_the_share_the_pattern_drops():
    generator = torch.Generator().manual_seed(5)
    X = torch.randn(64, 8, generator=generator)
    Hinv = torch.linalg.inv(X.T @ X / 64 + 0.1 * torch.eye(8))
    Ws = [torch.randn(4, 8, generator=generator), torch.randn(6, 8, generator=generator)]
    R = orthogonal(torch.randn(8, 8, generator=generator))
    Hinv_rotated = R.T @ Hinv @ R
    expected = sum(dropped_share(importance(W @ R, Hinv_rotated), 0.5, 2, 4) for W in Ws)
    got = residual_rotation_loss([(Ws, Hinv)], R, "dropped", (0.5, 2, 4))
    assert torch.allclose(got, expected, rtol=1e-4)
    _, losses = learn_residual_rotation([(Ws, Hinv)], steps=40, objective="dropped", pattern=(0.5, 2, 4))
    assert losses[-1] < losses[0] < len(Ws)  # shares, one per module, and they fall
    with pytest.raises(ValueError, match=r"objective='spread' is not one of \['entropy', 'dropped'\]"):
        residual_rotation_loss([(Ws, Hinv)], R, "spread")


def test_residual_rotation_is_orthogonal_deterministic_and_lowers_the_full_loss():
    generator = torch.Generator().manual_seed(4)
    groups = []
    for _ in range(3):
        X = torch.randn(80, 16, generator=generator) * torch.linspace(0.2, 3.0, 16)
        Hinv = torch.linalg.inv(X.T @ X / 80 + 0.01 * torch.eye(16))
        groups.append(([torch.randn(20, 16, generator=generator), torch.randn(9, 16, generator=generator)], Hinv))
    R, losses = learn_residual_rotation(groups, steps=40, groups_per_step=2, rows_per_module=8)
    again, _ = learn_residual_rotation(groups, steps=40, groups_per_step=2, rows_per_module=8)
    assert torch.equal(R, again)
    assert torch.allclose(R.T @ R, torch.eye(16), atol=1e-5)
    assert losses[-1] < 0.97 * losses[0]  # the full loss falls though each step saw a sample
    assert losses[0] == pytest.approx(residual_rotation_loss(groups, torch.eye(16)).item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs at least one group"):
        learn_residual_rotation([])


def test_the_config_offers_exactly_the_objectives_the_math_knows():
    from rose_hf import rotation
    from rose_hf.config import ROTATION_OBJECTIVES

    assert ROTATION_OBJECTIVES == rotation.ROTATION_OBJECTIVES


def test_rotate_rows_rounds_the_float64_product_once_over_every_slice():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(9000, 48, generator=generator)  # more rows than one slice
    R = orthogonal(torch.randn(48, 48, generator=generator))
    scale = torch.rand(48, generator=generator) + 0.5
    exact = (weight.double() * scale.double()) @ R.double()
    whole = rotate_rows(weight, R, scale)
    assert whole.dtype == torch.float32
    torch.testing.assert_close(whole.double(), exact, rtol=1.2e-7, atol=1e-12)  # one float32 rounding
    assert rotate_rows(weight.to(torch.bfloat16), R).dtype == torch.bfloat16


def test_the_residual_learning_reads_groups_in_their_own_dtype_as_their_float32_values():
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(256, 32, generator=generator)
    Hinv = torch.linalg.inv(X.T @ X / 256 + 0.01 * torch.eye(32))
    weights = [torch.randn(24, 32, generator=generator).to(torch.bfloat16) for _ in range(2)]
    kept = learn_residual_rotation([(weights, Hinv)], steps=5, rows_per_module=8)
    converted = learn_residual_rotation([([W.float() for W in weights], Hinv)], steps=5, rows_per_module=8)
    assert torch.equal(kept[0], converted[0]) and kept[1] == converted[1]
    assert weights[0].dtype == torch.bfloat16  # not converted in place
