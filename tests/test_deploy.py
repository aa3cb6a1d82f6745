"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas, and every recipe
(Kubernetes, Slurm) runs real ``caviar`` commands with workers that hold no database credentials."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from caviar.service.config import Settings
from tests.test_compose import CLIENT_VARIABLES, parse_cli

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
DOCUMENTS: list[dict[str, Any]] = [
    doc
    for name in KUSTOMIZATION["resources"]
    for doc in yaml.safe_load_all((KUBERNETES / name).read_text())
    if doc
]
KUBERNETES_VERSION = "1.30.0"


def by_kind(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in DOCUMENTS if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"])


def test_every_listed_file_exists_and_every_manifest_is_listed() -> None:
    listed = set(KUSTOMIZATION["resources"])
    present = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifests_validate_against_the_kubernetes_schemas(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_broken_manifest_is_caught() -> None:
    broken = json.loads(json.dumps(by_kind("Deployment", "caviar-api")))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_every_container_runs_a_real_caviar_command_with_known_settings() -> None:
    fields = {f"CAVIAR_{name.upper()}" for name in Settings.model_fields} | CLIENT_VARIABLES
    for doc in DOCUMENTS:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        for container in containers(doc):
            assert container["image"] == "caviar"
            parse_cli(container["args"])
            for variable in container.get("env", []):
                assert variable["name"] in fields, variable["name"]


def test_the_api_is_replicated_behind_a_service_and_migrated_by_a_job() -> None:
    api = by_kind("Deployment", "caviar-api")
    assert api["spec"]["replicas"] >= 2
    (container,) = containers(api)
    assert container["args"][:1] == ["serve"] and "--no-migrate" in container["args"]
    service = by_kind("Service", "caviar-api")
    assert service["spec"]["selector"] == api["spec"]["template"]["metadata"]["labels"]
    (migrate,) = containers(by_kind("Job", "caviar-migrate"))
    assert migrate["args"] == ["db", "upgrade"]


def test_workers_hold_the_url_and_the_worker_token_only() -> None:
    worker = by_kind("Deployment", "caviar-worker")
    (container,) = containers(worker)
    env = {v["name"]: v for v in container["env"]}
    assert set(env) == CLIENT_VARIABLES
    assert env["CAVIAR_URL"]["value"] == "http://caviar-api:8000"
    assert env["CAVIAR_API_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "worker-token"
    assert "database" not in json.dumps(worker).lower()
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30


def test_the_slurm_array_job_runs_a_worker_with_no_database() -> None:
    script = (ROOT / "deploy" / "slurm" / "caviar-worker.sbatch").read_text()
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", "-c", script], check=True)
    (command,) = re.findall(r"^exec caviar (worker .*)$", script, re.M)
    # the shell's expansions, with the defaults the script gives them
    command = re.sub(r'"\$\{(\w+):-([^}]*)\}"', r"\2", command)
    command = re.sub(r"\$\{\w+:-\}", "", command).replace('"$CAVIAR_URL"', "http://head:8000")
    parse_cli(shlex.split(command))
    assert "--url" in command and "DATABASE" not in script
