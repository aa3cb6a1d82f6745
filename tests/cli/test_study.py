"""``caviar study ...`` over REST against one live service (errors are one line)."""

from __future__ import annotations

import copy
import csv
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import caviar
from caviar._client import Study
from tests.cli.conftest import Service
from tests.service.helpers import external_study


@pytest.fixture(scope="module")
def finished(service: Service) -> str:
    """Study ``cli``: 3 complete trials of 3 (values 0.3, 0.9, 0.6), completed. Tests only read it."""
    service.finished_study("cli")
    return "cli"


def write(tmp_path: Path, name: str, *documents: dict[str, Any]) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    return str(path)


def test_version(service: Service) -> None:
    assert service.run("--version").strip() == f"caviar {caviar.__version__}"


def test_trials_best_show_and_list(service: Service, finished: str) -> None:
    best = service.json("study", "best", finished)
    assert best["number"] == 1 and best["value"] == 0.9
    trials = service.json("study", "trials", finished, "--state", "complete")
    assert [t["number"] for t in trials] == [0, 1, 2]
    table = service.run("study", "trials", finished)
    assert "complete" in table and "lr=" in table
    assert "0.9" in service.run("study", "best", finished)
    shown = service.json("study", "show", finished)
    assert shown["state"] == "completed" and shown["trial_counts"]["complete"] == 3
    assert "completed" in service.run("study", "show", finished)
    listed = service.json("study", "list")
    assert finished in [s["name"] for s in listed["items"]]
    assert "3/3" in service.run("study", "list")


def test_trials_show_the_pbt_lineage(service: Service, finished: str) -> None:
    with service.http() as http:  # as a worker tells a trial that copied trial 0 at epoch 4 (its 2nd copy)
        assert http.post("/api/v1/studies", json=external_study("lineage", n_trials=2)).status_code == 201
        attrs = {"pbt_parent": 0, "pbt_step": 4, "pbt_exploits": 2, "pbt_2": '{"parent":0,"step":4}'}
        for user_attrs in ({}, attrs):
            number = http.post("/api/v1/studies/lineage/trials/ask", json={}).json()["number"]
            body = {"state": "complete", "value": 0.8, "user_attrs": user_attrs}
            assert http.post(f"/api/v1/studies/lineage/trials/{number}/tell", json=body).status_code == 200
    table = service.run("study", "trials", "lineage")
    assert "pbt parent" in table and "#0@4 (2x)" in table
    assert service.json("study", "trials", "lineage")[1]["user_attrs"]["pbt_parent"] == 0
    assert "pbt parent" not in service.run("study", "trials", finished)  # only studies with a lineage


def test_export_csv_and_json(service: Service, finished: str, tmp_path: Path) -> None:
    rows = list(csv.DictReader(io.StringIO(service.run("study", "export", finished, "--format", "csv"))))
    assert [row["number"] for row in rows] == ["0", "1", "2"]
    assert {"value", "params.lr", "params.beta1", "params.dropout", "state"} <= set(rows[0])
    assert float(rows[1]["value"]) == 0.9 and 0.8 <= float(rows[1]["params.beta1"]) <= 0.999
    out = tmp_path / "trials.json"
    written = service.invoke("study", "export", finished, "--format", "json", "-o", str(out))
    assert "wrote 3 trials" in written.stderr
    assert [t["value"] for t in json.loads(out.read_text())] == [0.3, 0.9, 0.6]
    bad = service.invoke("study", "export", finished, "--format", "xml", code=1)
    assert "csv or json" in bad.output


def test_refine_creates_a_narrowed_study(service: Service, finished: str) -> None:
    study = service.json("study", "refine", finished, "--min-top", "2", "--n-trials", "5")
    assert study["name"] != finished and study["definition"]["budget"]["n_trials"] == 5
    assert "refined from cli" in service.run("study", "refine", finished, "--min-top", "2")


def test_watch_ends_when_the_study_completes(service: Service, finished: str) -> None:
    output = service.run("study", "watch", finished, "--interval", "0.1")
    assert "completed" in output and "0.9" in output


def test_watch_follows_a_running_study_until_it_completes(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`study watch` on a study that is still running keeps polling while trials finish and ends
    (with the final best) only once the last trial is told."""
    seen: list[tuple[str, int]] = []
    original = Study.info

    def recording(self: Study) -> dict[str, Any]:
        study = original(self)
        seen.append((study["state"], study["trial_counts"]["complete"]))
        return study

    monkeypatch.setattr(Study, "info", recording)
    api = "/api/v1/studies/watched"
    with service.http() as http:
        assert http.post("/api/v1/studies", json=external_study("watched", n_trials=3)).status_code == 201
        first = http.post(f"{api}/trials/ask", json={}).json()["number"]  # running now
    errors: list[BaseException] = []

    def finish_trials() -> None:
        try:
            with service.http() as http:
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
    output = service.run("study", "watch", "watched", "--interval", "0.1")
    teller.join(30)
    assert not errors, errors
    assert time.monotonic() - started >= 1.0  # it waited for the trials, it did not return at once
    assert seen[0] == ("running", 0), seen
    assert seen[-1] == ("completed", 3), seen
    assert [state for state, _ in seen].count("completed") == 1  # stopped polling at the end
    assert {done for _, done in seen} >= {0, 1, 2, 3}  # progress was seen trial by trial
    assert "study watched completed: best 0.8" in " ".join(output.split())


def test_create_and_errors_are_one_line(service: Service, finished: str, tmp_path: Path) -> None:
    definition = write(tmp_path, "made", external_study("made-remotely"))
    assert "created study made-remotely (queued)" in service.run("study", "create", "-f", definition)
    assert service.json("study", "show", "made-remotely")["state"] == "queued"
    denied = service.invoke("study", "show", finished, "--token", "wrong", code=1)
    assert "invalid or revoked token" in denied.stderr and "Traceback" not in denied.output
    assert len(denied.stderr.strip().splitlines()) == 1
    missing = service.invoke("study", "best", "nope", code=1)
    assert "nope" in missing.stderr
    duplicate = service.invoke("study", "create", "-f", definition, code=1)
    assert "already exists" in duplicate.stderr


def test_a_file_of_several_definitions_creates_each_in_order(service: Service, tmp_path: Path) -> None:
    """YAML (multi-document) and JSON files; a refusal names the studies created before it."""
    first, second = external_study("multi-1"), external_study("multi-2")
    created = service.json("study", "create", "-f", write(tmp_path, "two", first, second))
    assert [s["name"] for s in created] == ["multi-1", "multi-2"]
    listed = {s["name"] for s in service.json("study", "list")["items"]}
    assert {"multi-1", "multi-2"} <= listed
    as_json = tmp_path / "one.json"
    as_json.write_text(json.dumps(external_study("from-json")))
    assert service.json("study", "create", "-f", str(as_json))["name"] == "from-json"
    bad = copy.deepcopy(external_study("multi-bad"))
    bad["search_space"] = {"lr": {"type": "float", "low": 1, "high": 0}}  # an empty one is valid for external
    refused = service.invoke(
        "study", "create", "-f", write(tmp_path, "mixed", external_study("multi-3"), bad), code=1
    )
    assert "created study multi-3 before the error" in refused.stderr and "search_space" in refused.stderr
    assert "Traceback" not in refused.output


def test_file_errors_are_one_line(service: Service, tmp_path: Path) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)
    )
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    assert "not valid YAML" in service.invoke("study", "create", "-f", str(path), code=1).stderr
    missing = service.invoke("study", "create", "-f", str(tmp_path / "none.yaml"), code=1)
    assert "no such file" in missing.stderr
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n")
    assert "expected a mapping" in service.invoke("study", "create", "-f", str(scalar), code=1).stderr


def test_the_cli_prints_escape_sequences_escaped(service: Service) -> None:
    body = external_study("escapes")
    body["search_space"]["color"] = {"type": "categorical", "choices": ["\u001b[31mred", "[bold]blue"]}
    with service.http() as http:
        assert http.post("/api/v1/studies", json=body).status_code == 201
        assert http.post("/api/v1/studies/escapes/trials/ask", json={}).status_code == 200
    output = service.run("study", "trials", "escapes")
    assert "\u001b[31m" not in output and "\\x1b" in output


def test_pause_resume_stop_and_delete(service: Service, tmp_path: Path) -> None:
    service.run("study", "create", "-f", write(tmp_path, "steer", external_study("steer", n_trials=5)))
    assert "paused" in service.run("study", "pause", "steer")
    assert service.json("study", "resume", "steer")["state"] == "queued"
    stopped = service.json("study", "stop", "steer", "--reason", "enough")
    assert stopped["state"] == "stopped" and stopped["stop_reason"] == "stopped by request: enough"
    assert "cannot be stopped" in service.invoke("study", "stop", "steer", code=1).stderr
    service.invoke("study", "delete", "steer", input="n\n", code=1)
    assert "deleted" in service.run("study", "delete", "steer", "--yes")
    assert "steer" in service.invoke("study", "show", "steer", code=1).stderr


def test_extend_and_set(service: Service) -> None:
    service.finished_study("grow")
    extended = service.json("study", "extend", "grow", "--by", "2")
    assert extended["state"] == "running"  # the completed study is reopened
    assert extended["definition"]["budget"]["n_trials"] == 5
    assert "n_trials 3" in service.run("study", "set", "grow", "--n-trials", "3")  # done again
    assert service.json("study", "show", "grow")["state"] == "completed"
    assert "does not raise" in service.invoke("study", "extend", "grow", "--n-trials", "2", code=1).stderr
    assert "give --n-trials N" in service.invoke("study", "extend", "grow", code=1).stderr
    assert "already used" in service.invoke("study", "set", "grow", "--n-trials", "2", code=1).stderr
    changed = service.json(
        "study", "set", "grow", "--priority", "5", "--max-parallel", "4", "--tag", "team=vision",
        "--goal", "0.99", "--trial-timeout", "600",
    )  # fmt: skip
    definition = changed["definition"]
    assert changed["priority"] == 5 and definition["tags"] == {"team": "vision"}
    assert definition["budget"]["max_parallel"] == 4 and definition["budget"]["goal"] == {"value": 0.99}
    assert definition["budget"]["trial_timeout_s"] == 600
    cleared = service.json(
        "study", "set", "grow", "--max-parallel", "none", "--goal", "none", "--untag", "team"
    )
    assert cleared["definition"]["budget"]["max_parallel"] is None
    assert cleared["definition"]["budget"]["goal"] is None and cleared["definition"]["tags"] == {}
    assert "nothing to change" in service.invoke("study", "set", "grow", code=1).stderr
    assert "--max-parallel" in service.invoke("study", "set", "grow", "--max-parallel", "many", code=1).stderr
    assert "--tag" in service.invoke("study", "set", "grow", "--tag", "novalue", code=1).stderr


def test_enqueue_from_a_file_and_importances(service: Service, finished: str, tmp_path: Path) -> None:
    params = write(
        tmp_path,
        "params",
        {"lr": 0.01, "beta1": 0.95, "dropout": 0.1},
        {"params": {"lr": 0.02, "beta1": 0.9, "dropout": 0.2}, "value": 0.5},
    )
    service.run("study", "create", "-f", write(tmp_path, "enq", external_study("enq", n_trials=5)))
    assert "no importances yet" in service.run("study", "importances", "enq")
    assert "1 enqueued, 1 imported" in service.run("study", "enqueue", "enq", "-f", params)
    listed = service.json("study", "trials", "enq")
    assert [t["state"] for t in listed] == ["waiting", "complete"]
    assert listed[0]["params"] == {"lr": 0.01, "beta1": 0.95, "dropout": 0.1}
    bad = write(tmp_path, "bad", {"lr": 0.5, "beta1": 0.95, "dropout": 0.1})
    assert "trials.0.params.lr" in service.invoke("study", "enqueue", "enq", "-f", bad, code=1).stderr
    data = service.json("study", "importances", finished)
    assert set(data["importances"]) == {"lr", "beta1", "dropout"}
    assert "parameter" in service.run("study", "importances", finished)


def test_create_with_warm_start(service: Service, finished: str, tmp_path: Path) -> None:
    definition = write(tmp_path, "warm", external_study("warm", n_trials=5))
    output = service.run("study", "create", "-f", definition, "--warm-start", f"{finished}:2")
    assert "warm start from cli: 2 trials enqueued, 0 skipped" in output
    assert service.json("study", "show", "warm")["trial_counts"]["waiting"] == 2
    assert (
        "--warm-start"
        in service.invoke("study", "create", "-f", definition, "--warm-start", "cli:x", code=1).stderr
    )
    unknown = write(tmp_path, "unknown", external_study("unknown-source"))
    missing = service.invoke("study", "create", "-f", unknown, "--warm-start", "nope", code=1)
    assert "warm_start.from" in missing.stderr


def test_checkpoints_artifacts_and_downloads(
    service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint uploaded with a trial comes back byte for byte through `caviar study checkpoint`
    (by default the best complete trial that has one: here not the best trial, which stored none),
    and any stored file through `study artifacts` / `study download`."""
    api = "/api/v1/studies/ckpt"
    weights = bytes(range(256)) * 64 + b"\x00end"
    with service.http() as http:
        assert http.post("/api/v1/studies", json=external_study("ckpt", n_trials=2)).status_code == 201
        for value, content in ((0.2, weights), (0.9, None)):
            number = http.post(f"{api}/trials/ask", json={}).json()["number"]
            if content is not None:
                for filename in ("checkpoint.pt", "notes.txt"):
                    uploaded = http.post(
                        f"{api}/trials/{number}/artifacts", params={"filename": filename}, content=content
                    )
                    assert uploaded.status_code == 201, uploaded.text
            told = http.post(f"{api}/trials/{number}/tell", json={"state": "complete", "value": value})
            assert told.status_code == 200, told.text
    target = tmp_path / "best.pt"
    assert "trial 0" in service.run("study", "checkpoint", "ckpt", "-o", str(target))
    assert target.read_bytes() == weights
    monkeypatch.chdir(tmp_path)
    assert "ckpt-trial0-checkpoint.pt" in service.run("study", "checkpoint", "ckpt", "--trial", "0")
    assert (tmp_path / "ckpt-trial0-checkpoint.pt").read_bytes() == weights
    assert "no checkpoint" in service.invoke("study", "checkpoint", "ckpt", "--trial", "1", code=1).stderr
    files = service.json("study", "artifacts", "ckpt", "--trial", "0")
    assert sorted(item["filename"] for item in files) == ["checkpoint.pt", "notes.txt"]
    assert "notes.txt" in service.run("study", "artifacts", "ckpt", "--trial", "0")
    service.run("study", "download", "ckpt", "notes.txt", "--trial", "0")
    assert (tmp_path / "ckpt-trial0-notes.txt").read_bytes() == weights
    assert (
        service.invoke("study", "download", "ckpt", "notes.txt", "--trial", "0", "-o", "-").stdout_bytes
        == weights
    )
