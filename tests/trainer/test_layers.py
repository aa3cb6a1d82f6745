"""Fused layers: equivalence with per-member maths, dropout, batch norm, augmentation, gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from caviar.trainer import gradcheck
from caviar.trainer._gradcheck import THRESHOLD
from caviar.trainer._layers import FusedBatchNorm, FusedConv2d, FusedLinear, FusedMLP, fused_dropout
from caviar.trainer._rng import STREAM_AUGMENT, STREAM_DROPOUT, member_generators
from caviar.trainer._train import augment_batch


def test_fused_linear_and_conv_match_per_member_layers() -> None:
    torch.manual_seed(0)
    lin = FusedLinear(3, 5, 4)
    with torch.no_grad():
        lin.weight.normal_()
        lin.bias.normal_()
    x = torch.randn(3, 7, 5)
    out = lin(x)
    for k in range(3):
        assert torch.allclose(out[k], x[k] @ lin.weight[k] + lin.bias[k], atol=1e-6)
    conv = FusedConv2d(3, 2, 4)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    images = torch.randn(3, 5, 2, 6, 6)
    fused = conv(images.transpose(0, 1).reshape(5, 6, 6, 6)).view(5, 3, 4, 6, 6)
    for k in range(3):
        assert torch.allclose(
            fused[:, k], F.conv2d(images[k], conv.weight[k], conv.bias[k], padding=1), atol=1e-5
        )


def test_member_init_depends_only_on_its_seed() -> None:
    a = FusedMLP(3, 6, 2, layers=2, hidden_units=8, batch_norm=False)
    a.init_members([5, 6, 7], "he")
    b = FusedMLP(1, 6, 2, layers=2, hidden_units=8, batch_norm=False)
    b.init_members([6], "he")
    for name, tensor in b.state_dict().items():
        assert torch.equal(tensor[0], a.state_dict()[name][1])
    xavier = FusedLinear(1, 100, 100)
    xavier.init_member(0, "xavier", torch.Generator().manual_seed(0))
    assert xavier.weight.abs().max() <= (6 / 200) ** 0.5
    he = FusedLinear(1, 400, 400)
    he.init_member(0, "he", torch.Generator().manual_seed(0))
    assert he.weight.std().item() == pytest.approx((2 / 400) ** 0.5, rel=0.02)


def test_inverted_dropout_preserves_the_mean_and_only_runs_in_training() -> None:
    x = torch.ones(3, 200, 500)
    rate = torch.tensor([0.0, 0.2, 0.5])
    out = fused_dropout(x, rate, member_generators([1, 2, 3], STREAM_DROPOUT, x.device))
    assert torch.equal(out[0], x[0])  # rate 0 is the identity
    for k, p in enumerate(rate.tolist()[1:], start=1):
        assert (out[k] == 0).float().mean().item() == pytest.approx(p, abs=0.01)
        assert out[k].mean().item() == pytest.approx(1.0, abs=0.01)
        # Rates are rounded to multiples of 1/65536.
        assert out[k][out[k] != 0].unique().tolist() == pytest.approx([1 / (1 - p)], rel=1e-4)
    net = FusedMLP(2, 4, 3, layers=1, hidden_units=16, batch_norm=False)
    net.init_members([0, 1], "he")
    inputs, rates = torch.randn(2, 8, 4), torch.tensor([0.5, 0.5])
    gens = member_generators([3, 4], STREAM_DROPOUT, inputs.device)
    net.train()
    assert not torch.equal(net(inputs, rates, gens), net(inputs))
    net.eval()
    assert torch.equal(net(inputs, rates, gens), net(inputs))


def test_batch_norm_uses_batch_stats_in_training_and_running_stats_in_eval() -> None:
    bn = FusedBatchNorm(2, 3)
    x = torch.randn(2, 64, 3) * 4 + 10
    bn.train()
    out = bn(x)
    assert out.mean(dim=1).abs().max() < 1e-5
    assert out.std(dim=1, unbiased=False).sub(1).abs().max() < 1e-3
    assert torch.allclose(bn.running_mean, 0.1 * x.mean(dim=1), atol=1e-5)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * x.var(dim=1, unbiased=True), atol=1e-4)
    bn.eval()
    evaluated = bn(x)
    assert not torch.allclose(evaluated, out, atol=1e-2)
    expected = (x - bn.running_mean.unsqueeze(1)) / torch.sqrt(bn.running_var.unsqueeze(1) + bn.eps)
    assert torch.allclose(evaluated, expected, atol=1e-5)
    # The conv layout (B, K*C, H, W) keeps per-member statistics too.
    bn2 = FusedBatchNorm(2, 3).train()
    images = torch.randn(5, 6, 4, 4)
    images[:, 3:] += 7.0  # member 1 only
    bn2(images)
    assert torch.allclose(bn2.running_mean[1], 0.1 * images[:, 3:].mean(dim=(0, 2, 3)), atol=1e-5)


def test_augmentation_noise_and_shifts() -> None:
    def gens() -> list[torch.Generator]:
        return member_generators([0, 1], STREAM_AUGMENT, torch.device("cpu"))

    x = torch.randn(2, 400, 64)
    same = augment_batch(x, torch.tensor([0.0, 0.0]), gens(), (1, 8, 8))
    assert torch.equal(same, x)
    tabular = augment_batch(x, torch.tensor([0.0, 0.5]), gens(), None)
    assert torch.equal(tabular[0], x[0])
    assert (tabular[1] - x[1]).std().item() == pytest.approx(0.5, rel=0.05)
    images = torch.arange(64.0).repeat(2, 50, 1) + 1  # no zeros, so shifted-in zeros are visible
    shifted = augment_batch(images, torch.tensor([0.0, 1e-9]), gens(), (1, 8, 8))
    assert torch.equal(shifted[0], images[0])
    moved = (shifted[1] != images[1]).any(dim=1)
    assert 0.5 < moved.float().mean().item() < 1.0  # 8 of 9 offsets move the image
    zero_filled = (shifted[1].abs() < 1e-6).sum(dim=1) > 0
    assert zero_filled.eq(moved).all()  # a shifted image has zero-filled borders


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_gradcheck_passes(model: str) -> None:
    result = gradcheck(model=model, k=3, seed=0)
    expected = {"layers.0.weight", "layers.0.bias", "head.weight", "bn.norms.0.weight", "bn.norms.0.bias"}
    assert expected <= set(result)
    assert max(result.values()) < THRESHOLD, result
