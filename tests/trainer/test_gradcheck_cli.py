"""``caviar gradcheck`` runs the float64 gradient check on every fused layer and fails above 1e-7."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from caviar.cli import app
from caviar.trainer._layers import FusedLinear


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_gradcheck_command_passes(model: str) -> None:
    result = CliRunner().invoke(app, ["gradcheck", "--model", model, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["max"] < 1e-7
    assert any(name.startswith("bn.") for name in report["relative_difference"])  # batch norm covered


def test_gradcheck_refuses_an_unknown_model() -> None:
    result = CliRunner().invoke(app, ["gradcheck", "--model", "rnn"])
    assert result.exit_code == 1


class _WrongBackwardMatmul(torch.autograd.Function):
    """``x @ w`` whose backward returns a gradient for ``w`` that is 1% too large."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return torch.matmul(x, w)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        grad_x = torch.matmul(grad, w.transpose(-1, -2))
        grad_w = torch.matmul(x.transpose(-1, -2), grad) * 1.01
        return grad_x, grad_w


def test_gradcheck_command_fails_on_a_wrong_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fused linear layer whose backward is wrong makes `caviar gradcheck` exit 1, naming it."""

    def wrong_forward(self: FusedLinear, x: torch.Tensor) -> torch.Tensor:
        out = _WrongBackwardMatmul.apply(x, self.weight)
        return out if self.bias is None else out + self.bias.unsqueeze(1)

    monkeypatch.setattr(FusedLinear, "forward", wrong_forward)
    result = CliRunner().invoke(app, ["gradcheck", "--model", "mlp", "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert not report["ok"] and report["max"] > 1e-3
    assert report["relative_difference"]["layers.0.weight"] > 1e-3  # the broken gradient is named
    assert report["relative_difference"]["layers.0.bias"] < 1e-7  # the untouched ones still pass
    text = CliRunner().invoke(app, ["gradcheck", "--model", "mlp"])
    assert text.exit_code == 1 and "FAILED" in text.output
