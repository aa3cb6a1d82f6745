"""``caviar gradcheck`` runs the float64 gradient check on every fused layer and fails above 1e-7."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from caviar.service.cli import app


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
