"""StoP in the predictor: where the noise goes, its covariance, and when there is none."""

import pytest
import torch

from stoptool.models.predictor import Predictor

GRID, DE, DP = 4, 16, 8


def make(sigma=0.5, **kw) -> Predictor:
    torch.manual_seed(0)
    return Predictor(grid=GRID, embed_dim=DE, pred_dim=DP, depth=1, num_heads=2, sigma=sigma, **kw)


def base_tokens(p: Predictor, idx: torch.Tensor) -> torch.Tensor:
    return p.predictor_pos_embed[0][idx] + p.mask_token[0]


def test_sigma_zero_masked_tokens_are_position_plus_mask_token():
    p = make(sigma=0.0).train()
    idx = torch.tensor([[0, 5, 15]])
    assert torch.equal(p.masked_tokens(idx), base_tokens(p, idx))


def test_eval_mode_draws_no_noise():
    p = make(sigma=1.0).eval()
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(p.masked_tokens(idx), base_tokens(p, idx))
    ctx = torch.randn(1, 3, DE)
    out1 = p(ctx, torch.tensor([[4, 5, 6]]), idx[:, None])
    out2 = p(ctx, torch.tensor([[4, 5, 6]]), idx[:, None])
    assert torch.equal(out1, out2)


def test_noise_covariance_is_sigma_squared_A_At():
    sigma = 0.5
    p = make(sigma=sigma).train()
    n = 40_000
    idx = torch.zeros(n, 1, dtype=torch.long)
    with torch.no_grad():
        noise = (p.masked_tokens(idx) - base_tokens(p, idx)).reshape(n, DP)
    A = p.A.detach()
    expected = sigma**2 * A @ A.T
    empirical = torch.cov(noise.T)
    # sampling error of a covariance from n draws is about sqrt(2 / n) ≈ 0.7 % of its scale
    rel = (empirical - expected).norm() / expected.norm()
    assert rel < 0.03
    assert noise.mean(0).abs().max() < 4 * (expected.diag().max().sqrt() / n**0.5)


def test_noise_is_fresh_per_token_and_call():
    p = make(sigma=0.5).train()
    idx = torch.tensor([[3, 3]])  # the same position twice
    with torch.no_grad():
        a, b = p.masked_tokens(idx), p.masked_tokens(idx)
    assert not torch.allclose(a[0, 0], a[0, 1])
    assert not torch.allclose(a, b)


def test_context_tokens_carry_no_noise():
    p = make(sigma=1.0).train()
    ctx, ctx_idx = torch.randn(2, 5, DE), torch.randint(0, 16, (2, 5))
    train_tokens = p.context_tokens(ctx, ctx_idx)
    expect = p.predictor_embed(ctx) + p.predictor_pos_embed[0][ctx_idx]
    assert torch.equal(train_tokens, expect)


def test_noise_on_context_ablation_moves_noise():
    p = make(sigma=1.0, noise_on="context").train()
    ctx, ctx_idx = torch.randn(2, 5, DE), torch.randint(0, 16, (2, 5))
    idx = torch.tensor([[1, 2]])
    assert torch.equal(p.masked_tokens(idx), base_tokens(p, idx))
    assert not torch.allclose(p.context_tokens(ctx, ctx_idx), p.context_tokens(ctx, ctx_idx))


def test_fixed_covariance_is_isotropic_in_predictor_width():
    sigma = 0.3
    p = make(sigma=sigma, cov="fixed").train()
    idx = torch.zeros(20_000, 1, dtype=torch.long)
    with torch.no_grad():
        noise = (p.masked_tokens(idx) - base_tokens(p, idx)).reshape(-1, DP)
    cov = torch.cov(noise.T)
    assert torch.allclose(cov, sigma**2 * torch.eye(DP), atol=0.01)


@pytest.mark.parametrize("sigma, expect_grad", [(0.5, True), (0.0, False)])
def test_A_gets_gradient_through_the_noise_path_alone(sigma, expect_grad):
    p = make(sigma=sigma).train()
    ctx = torch.zeros(2, 5, DE)  # A s = 0: the context path gives A no gradient
    out = p(ctx, torch.randint(0, 16, (2, 5)), torch.randint(0, 16, (2, 2, 3)))
    out.square().sum().backward()
    grad = p.predictor_embed.weight.grad
    assert (grad.abs().sum() > 0) == expect_grad
    assert p.predictor_embed.bias.grad.abs().sum() > 0  # b is trained either way


def test_forward_shape():
    p = make()
    out = p(torch.randn(3, 6, DE), torch.randint(0, 16, (3, 6)), torch.randint(0, 16, (3, 4, 2)))
    assert out.shape == (3, 4, 2, DE)


@pytest.mark.parametrize("init, rescaled", [("released", False), ("timm", True)])
def test_predictor_init_follows_the_encoder_scheme(init, rescaled):
    torch.manual_seed(0)
    pred = Predictor(grid=14, embed_dim=384, pred_dim=384, depth=6, num_heads=6, init=init)
    for layer in (1, 6):
        block = pred.predictor_blocks[layer - 1]
        expected = 0.02 / (2 * layer) ** 0.5 if rescaled else 0.02
        assert abs(float(block.mlp.fc2.weight.detach().std()) - expected) < 0.05 * expected
        assert abs(float(block.attn.qkv.weight.detach().std()) - 0.02) < 0.001
    embed = pred.predictor_embed
    assert abs(float(embed.weight.detach().std()) - 0.02) < 0.001 and not embed.bias.any()
