"""Architecture rules: service/ never imports torch, trainer/ never imports FastAPI."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [
        (["service.api", "service.cli", "service.trials.service", "service.schedules.service"], "torch"),
        (["trainer", "trainer.worker"], "fastapi"),
    ],
)
def test_layers_do_not_import_each_others_stack(modules: list[str], forbidden: str) -> None:
    code = (
        "import sys\n" + "".join(f"import {m}\n" for m in modules) + f"print({forbidden!r} in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", f"{modules} import {forbidden}"
