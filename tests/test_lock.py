"""The dependency lock (requirements/constraints.txt) matches pyproject.toml.

Every install (``make install``, CI, the Dockerfile) takes its versions from the lock, so a
dependency added to pyproject.toml or a range moved there without ``make lock`` would install an
unpinned or out-of-range version. Offline: it reads the two files, it does not resolve.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "constraints.txt"


def locked_versions(text: str) -> dict[str, Version]:
    """``name==version`` lines of a pip constraints file, by canonical name."""
    pins: dict[str, Version] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"the lock pins exactly: {line}"
        pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def stale_entries(project: dict, pins: dict[str, Version]) -> list[str]:  # type: ignore[type-arg]
    """What the lock lacks or pins outside pyproject's range (runtime and every extra)."""
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    problems = []
    for line in declared:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        if name == canonicalize_name(project.get("name", "")):
            continue  # an extra that includes another extra of this project (dev -> docs)
        if name not in pins:
            problems.append(f"{requirement.name}: not in the lock")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(
                f"{requirement.name}: locked {pins[name]}, pyproject asks {requirement.specifier}"
            )
    return problems


def test_the_lock_pins_every_dependency_of_pyproject_within_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked_versions(LOCK.read_text())
    assert not stale_entries(project, pins), "the lock is stale: run `make lock`"
    assert pins["torch"] == Version("2.13.0")  # the CPU build on this project's machines


def test_a_new_or_moved_dependency_makes_the_lock_stale() -> None:
    pins = locked_versions("fastapi==0.165.0\ntorch==2.13.0\n    # via caviar-hpo\n")
    project = {"dependencies": ["fastapi>=0.115,<1", "torch>=2.3,<3"], "optional-dependencies": {}}
    assert stale_entries(project, pins) == []
    project["optional-dependencies"] = {"docs": ["mkdocs>=1.6"]}
    assert stale_entries(project, pins) == ["mkdocs: not in the lock"]
    project = {"dependencies": ["fastapi>=0.170,<1", "torch>=2.3,<3"]}
    assert stale_entries(project, pins) == ["fastapi: locked 0.165.0, pyproject asks <1,>=0.170"]
