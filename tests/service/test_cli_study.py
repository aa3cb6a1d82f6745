"""`caviar study ...` on the local database and, with --url/--token, on a remote service over REST."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import SecretStr
from typer.testing import CliRunner

import caviar
from caviar.service.api import create_app
from caviar.service.cli import app as cli_app
from tests.service.helpers import external_study
from tests.service.test_dashboard import free_port, live_server

TOKEN = "cli-admin-token-0123456789abcdef"
runner = CliRunner()


@pytest.fixture
def remote(settings, db) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A live service with a token, holding study `cli` (3 complete trials of 3: completed)."""
    secured = settings.model_copy(update={"api_token": SecretStr(TOKEN), "background_tasks": False})
    app = create_app(secured, db=db)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app) as client:
        assert (
            client.post(
                "/api/v1/studies", json=external_study("cli", n_trials=3), headers=headers
            ).status_code
            == 201
        )
        for value in (0.3, 0.9, 0.6):
            number = client.post("/api/v1/studies/cli/trials/ask", json={}, headers=headers).json()["number"]
            body = {"state": "complete", "value": value}
            assert (
                client.post(
                    f"/api/v1/studies/cli/trials/{number}/tell", json=body, headers=headers
                ).status_code
                == 200
            )
    with live_server(create_app(secured, db=db), free_port()) as base:
        yield base


def run(*args: str) -> str:
    result = runner.invoke(cli_app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def both(db_url: str, base: str) -> list[list[str]]:
    """The flags for each backend: the local database, then the remote service."""
    return [["--database-url", db_url], ["--url", base, "--token", TOKEN]]


def test_trials_best_and_show_agree_across_backends(remote: str, db_url: str) -> None:
    local_flags, remote_flags = both(db_url, remote)
    for command in (["trials", "cli", "--json"], ["best", "cli", "--json"], ["show", "cli", "--json"]):
        local = json.loads(run("study", *command, *local_flags))
        over_rest = json.loads(run("study", *command, *remote_flags))
        assert local == over_rest, command
    best = json.loads(run("study", "best", "cli", "--json", *remote_flags))
    assert best["number"] == 1 and best["value"] == 0.9
    trials = json.loads(run("study", "trials", "cli", "--json", "--state", "complete", *remote_flags))
    assert [t["number"] for t in trials] == [0, 1, 2]
    table = run("study", "trials", "cli", *remote_flags)
    assert "complete" in table and "lr=" in table
    assert "0.9" in run("study", "best", "cli", *local_flags)
    listed = json.loads(run("study", "list", "--json", *remote_flags))
    assert [s["name"] for s in listed["items"]] == ["cli"]


def test_export_csv_and_json(remote: str, db_url: str, tmp_path: Path) -> None:
    for flags in both(db_url, remote):
        rows = list(csv.DictReader(io.StringIO(run("study", "export", "cli", "--format", "csv", *flags))))
        assert [row["number"] for row in rows] == ["0", "1", "2"]
        assert {"value", "params.lr", "params.beta1", "params.dropout", "state"} <= set(rows[0])
        assert float(rows[1]["value"]) == 0.9 and 0.8 <= float(rows[1]["params.beta1"]) <= 0.999
    out = tmp_path / "trials.json"
    run("study", "export", "cli", "--format", "json", "-o", str(out), "--url", remote, "--token", TOKEN)
    assert [t["value"] for t in json.loads(out.read_text())] == [0.3, 0.9, 0.6]
    bad = runner.invoke(cli_app, ["study", "export", "cli", "--format", "xml", "--database-url", db_url])
    assert bad.exit_code == 1 and "csv or json" in bad.output


def test_refine_creates_a_narrowed_study_on_either_backend(remote: str, db_url: str) -> None:
    names = set()
    for flags in both(db_url, remote):
        study = json.loads(
            run("study", "refine", "cli", "--min-top", "2", "--n-trials", "5", "--json", *flags)
        )
        assert study["name"] != "cli" and study["definition"]["budget"]["n_trials"] == 5
        names.add(study["name"])
    assert len(names) == 2


def test_watch_ends_when_the_study_completes(remote: str, db_url: str) -> None:
    for flags in both(db_url, remote):
        output = run("study", "watch", "cli", "--interval", "0.1", *flags)
        assert "completed" in output and "0.9" in output


def test_watch_follows_a_running_study_until_it_completes(
    remote: str, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`study watch` on a study that is still running keeps polling while trials finish and ends
    (with the final best) only once the last trial is told."""
    import httpx

    from caviar.service.local import LocalBackend
    from caviar.service.remote import RemoteBackend

    seen: list[tuple[str, int]] = []
    for backend in (LocalBackend, RemoteBackend):
        original = backend.study

        def recording(self, name: str, _original=original) -> dict[str, Any]:  # type: ignore[no-untyped-def]
            study: dict[str, Any] = _original(self, name)
            seen.append((study["state"], study["trial_counts"]["complete"]))
            return study

        monkeypatch.setattr(backend, "study", recording)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for index, flags in enumerate(both(db_url, remote)):
        name = f"watch{index}"
        api = f"{remote}/api/v1/studies/{name}"
        with httpx.Client(headers=headers, timeout=30) as http:
            assert (
                http.post(f"{remote}/api/v1/studies", json=external_study(name, n_trials=3)).status_code
                == 201
            )
            first = http.post(f"{api}/trials/ask", json={}).json()["number"]  # running now
        seen.clear()
        errors: list[BaseException] = []

        def finish_trials(api: str = api, first: int = first, errors: list[BaseException] = errors) -> None:
            try:
                with httpx.Client(headers=headers, timeout=30) as http:
                    time.sleep(0.6)
                    for number, value in ((first, 0.4), (None, 0.8), (None, 0.7)):
                        if number is None:
                            number = http.post(f"{api}/trials/ask", json={}).json()["number"]
                        told = http.post(
                            f"{api}/trials/{number}/tell", json={"state": "complete", "value": value}
                        )
                        assert told.status_code == 200, told.text
                        time.sleep(0.3)
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)

        teller = threading.Thread(target=finish_trials)
        teller.start()
        started = time.monotonic()
        output = run("study", "watch", name, "--interval", "0.1", *flags)
        teller.join(30)
        assert not errors, errors
        assert time.monotonic() - started >= 1.0  # it waited for the trials, it did not return at once
        assert seen[0] == ("running", 0), seen
        assert seen[-1] == ("completed", 3), seen
        assert [state for state, _ in seen].count("completed") == 1  # stopped polling at the end
        assert {done for _, done in seen} >= {0, 1, 2, 3}  # progress was seen trial by trial
        assert f"study {name} completed: best 0.8" in " ".join(output.split())


def test_create_over_rest_and_errors_are_one_line(remote: str, db_url: str, tmp_path: Path) -> None:
    definition = tmp_path / "s.yaml"
    definition.write_text(yaml.safe_dump(external_study("made-remotely")))
    run("study", "create", "-f", str(definition), "--url", remote, "--token", TOKEN)
    assert (
        json.loads(run("study", "show", "made-remotely", "--json", "--database-url", db_url))["state"]
        == "queued"
    )

    denied = runner.invoke(cli_app, ["study", "show", "cli", "--url", remote, "--token", "wrong"])
    assert (
        denied.exit_code == 1
        and "invalid or revoked token" in denied.output
        and "Traceback" not in denied.output
    )
    missing = runner.invoke(cli_app, ["study", "best", "nope", "--url", remote, "--token", TOKEN])
    assert missing.exit_code == 1 and "nope" in missing.output
    unreachable = runner.invoke(cli_app, ["study", "list", "--url", "http://127.0.0.1:9", "--token", TOKEN])
    assert unreachable.exit_code == 1 and "cannot reach" in unreachable.output
    duplicate = runner.invoke(
        cli_app, ["study", "create", "-f", str(definition), "--url", remote, "--token", TOKEN]
    )
    assert duplicate.exit_code == 1 and "already exists" in duplicate.output


def _create(db_url: str, tmp_path: Path, name: str, **budget: Any) -> None:
    definition = tmp_path / f"{name}.yaml"
    definition.write_text(yaml.safe_dump(external_study(name, **budget)))
    run("study", "create", "-f", str(definition), "--database-url", db_url)


def test_version() -> None:
    output = run("--version")
    assert output.strip() == f"caviar {caviar.__version__}"


def test_pause_resume_stop_and_delete_on_either_backend(remote: str, db_url: str, tmp_path: Path) -> None:
    for index, flags in enumerate(both(db_url, remote)):
        name = f"steer{index}"
        _create(db_url, tmp_path, name, n_trials=5)
        assert "paused" in run("study", "pause", name, *flags)
        assert json.loads(run("study", "resume", name, "--json", *flags))["state"] == "queued"
        stopped = json.loads(run("study", "stop", name, "--reason", "enough", "--json", *flags))
        assert stopped["state"] == "stopped" and stopped["stop_reason"] == "stopped by request: enough"
        again = runner.invoke(cli_app, ["study", "stop", name, *flags])
        assert again.exit_code == 1 and "cannot be stopped" in again.output
        refused = runner.invoke(cli_app, ["study", "delete", name, *flags], input="n\n")
        assert refused.exit_code == 1
        assert "deleted" in run("study", "delete", name, "--yes", *flags)
        missing = runner.invoke(cli_app, ["study", "show", name, *flags])
        assert missing.exit_code == 1 and name in missing.output


def test_extend_and_set_on_either_backend(remote: str, db_url: str) -> None:
    for flags in both(db_url, remote):
        state = json.loads(run("study", "show", "cli", "--json", *flags))
        n_trials = state["definition"]["budget"]["n_trials"]
        extended = json.loads(run("study", "extend", "cli", "--by", "2", "--json", *flags))
        assert extended["state"] == "running"  # the completed study is reopened
        assert extended["definition"]["budget"]["n_trials"] == n_trials + 2
        assert "n_trials 3" in run("study", "set", "cli", "--n-trials", "3", *flags)  # done again
        assert json.loads(run("study", "show", "cli", "--json", *flags))["state"] == "completed"
        lower = runner.invoke(cli_app, ["study", "extend", "cli", "--n-trials", "2", *flags])
        assert lower.exit_code == 1 and "does not raise" in lower.output
        below = runner.invoke(cli_app, ["study", "set", "cli", "--n-trials", "2", *flags])
        assert below.exit_code == 1 and "already used" in below.output
        changed = json.loads(
            run(
                "study",
                "set",
                "cli",
                "--priority",
                "5",
                "--max-parallel",
                "4",
                "--tag",
                "team=vision",
                "--goal",
                "0.99",
                "--trial-timeout",
                "600",
                "--json",
                *flags,
            )
        )
        definition = changed["definition"]
        assert changed["priority"] == 5 and definition["tags"] == {"team": "vision"}
        assert definition["budget"]["max_parallel"] == 4 and definition["budget"]["goal"] == {"value": 0.99}
        cleared = json.loads(
            run(
                "study",
                "set",
                "cli",
                "--max-parallel",
                "none",
                "--goal",
                "none",
                "--untag",
                "team",
                "--json",
                *flags,
            )
        )
        assert cleared["definition"]["budget"]["max_parallel"] is None
        assert cleared["definition"]["budget"]["goal"] is None and cleared["definition"]["tags"] == {}
        nothing = runner.invoke(cli_app, ["study", "set", "cli", *flags])
        assert nothing.exit_code == 1 and "nothing to change" in nothing.output
        bad = runner.invoke(cli_app, ["study", "set", "cli", "--max-parallel", "many", *flags])
        assert bad.exit_code == 1 and "--max-parallel" in bad.output


def test_enqueue_from_a_file_and_importances(remote: str, db_url: str, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump_all(
            [
                {"lr": 0.01, "beta1": 0.95, "dropout": 0.1},
                {"params": {"lr": 0.02, "beta1": 0.9, "dropout": 0.2}, "value": 0.5},
            ]
        )
    )
    for index, flags in enumerate(both(db_url, remote)):
        name = f"enq{index}"
        _create(db_url, tmp_path, name, n_trials=5)
        output = run("study", "enqueue", name, "-f", str(params), *flags)
        assert "1 enqueued, 1 imported" in output
        listed = json.loads(run("study", "trials", name, "--json", *flags))
        assert [t["state"] for t in listed] == ["waiting", "complete"]
        assert listed[0]["params"] == {"lr": 0.01, "beta1": 0.95, "dropout": 0.1}
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({"lr": 0.5, "beta1": 0.95, "dropout": 0.1}))
        refused = runner.invoke(cli_app, ["study", "enqueue", name, "-f", str(bad), *flags])
        assert refused.exit_code == 1 and "trials.0.params.lr" in refused.output
    for flags in both(db_url, remote):
        data = json.loads(run("study", "importances", "cli", "--json", *flags))
        assert set(data["importances"]) == {"lr", "beta1", "dropout"}
        assert "parameter" in run("study", "importances", "cli", *flags)
    assert "no importances yet" in run("study", "importances", "enq0", "--database-url", db_url)


def test_create_with_warm_start(remote: str, db_url: str, tmp_path: Path) -> None:
    for index, flags in enumerate(both(db_url, remote)):
        definition = tmp_path / f"warm{index}.yaml"
        definition.write_text(yaml.safe_dump(external_study(f"warm{index}", n_trials=5)))
        output = run("study", "create", "-f", str(definition), "--warm-start", "cli:2", *flags)
        assert "warm start from cli: 2 trials enqueued, 0 skipped" in output
        study = json.loads(run("study", "show", f"warm{index}", "--json", *flags))
        assert study["trial_counts"]["waiting"] == 2
    bad = runner.invoke(
        cli_app, ["study", "create", "-f", str(definition), "--warm-start", "cli:x", "--database-url", db_url]
    )
    assert bad.exit_code == 1 and "--warm-start" in bad.output
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump(external_study("unknown-source")))
    missing = runner.invoke(
        cli_app,
        ["study", "create", "-f", str(unknown), "--warm-start", "nope", "--url", remote, "--token", TOKEN],
    )
    assert missing.exit_code == 1 and "warm_start.from" in missing.output


def test_checkpoint_upload_and_download_round_trip(
    remote: str,
    db_url: str,
    settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    """A checkpoint uploaded with a trial comes back byte for byte: over REST (GET .../checkpoint)
    and through `caviar study checkpoint` on either backend (by default the best complete trial
    that has one: here not the best trial, which stored none)."""
    import httpx

    monkeypatch.setenv("CAVIAR_ARTIFACT_DIR", settings.artifact_dir)  # the local backend's store
    headers = {"Authorization": f"Bearer {TOKEN}"}
    api = f"{remote}/api/v1/studies/ckpt"
    weights = bytes(range(256)) * 64 + b"\x00end"
    with httpx.Client(headers=headers, timeout=30) as http:
        assert (
            http.post(f"{remote}/api/v1/studies", json=external_study("ckpt", n_trials=2)).status_code == 201
        )
        for value, content in ((0.2, weights), (0.9, None)):
            number = http.post(f"{api}/trials/ask", json={}).json()["number"]
            if content is not None:
                uploaded = http.post(
                    f"{api}/trials/{number}/artifacts", params={"filename": "checkpoint.pt"}, content=content
                )
                assert uploaded.status_code == 201, uploaded.text
            told = http.post(f"{api}/trials/{number}/tell", json={"state": "complete", "value": value})
            assert told.status_code == 200, told.text
        downloaded = http.get(f"{api}/trials/0/checkpoint")
        assert downloaded.status_code == 200, downloaded.text
        assert downloaded.content == weights
        assert http.get(f"{api}/trials/1/checkpoint").status_code == 404  # trial 1 stored none
        best_with_one = http.get(f"{api}/checkpoint")
        assert best_with_one.status_code == 200 and best_with_one.content == weights
        assert "ckpt-trial0-checkpoint.pt" in best_with_one.headers["content-disposition"]
    for index, flags in enumerate(both(db_url, remote)):
        target = tmp_path / f"best{index}.pt"
        output = run("study", "checkpoint", "ckpt", "-o", str(target), *flags)
        assert "trial 0" in output
        assert target.read_bytes() == weights
        missing = runner.invoke(cli_app, ["study", "checkpoint", "ckpt", "--trial", "1", *flags])
        assert missing.exit_code == 1 and "no checkpoint" in missing.output
