"""The docs run: every code block of README.md and docs/*.md that is meant to run is run here.

The convention is written down in docs/development.md ("The docs"): ``python`` and ``bash`` blocks
run, in order per page, against one live ``caviar serve`` for this module; ``yaml`` study
definitions and schedules are checked by the real parser; ``<!-- not-run: reason -->`` before a
block shows it without running it, ``<!-- file: NAME -->`` writes it for the blocks after it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from caviar import _yaml
from caviar.service import processes
from caviar.service.definition import StudyDefinition, StudyTemplate
from caviar.service.schedules.schemas import ScheduleCreate

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python", "bash"}
CHECKED = {"yaml"}
FENCE = re.compile(r"^(?P<indent>[ ]*)(?P<ticks>`{3,})(?P<lang>[\w+-]*)[^`]*$")
MARK = re.compile(r"^\s*<!--\s*(?P<kind>not-run|file):\s*(?P<value>.*?)\s*-->\s*$")
ERROR_ENVELOPE = re.compile(r'"error"\s*:\s*\{\s*"code"')
BLOCK_TIMEOUT_S = 180


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    mark: str | None  # "not-run" | "file" | None
    value: str  # the reason, or the file name

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with the marker on the line before each."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, ticks = opening["indent"], opening["ticks"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(rf"^{indent}{ticks}`*\s*$", lines[j]):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        assert j < len(lines), f"{page.relative_to(ROOT)}:{i + 1}: unclosed code block"
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mark = MARK.match(lines[k]) if k >= 0 else None
        found.append(
            Block(
                page=page,
                line=i + 1,
                lang=opening["lang"],
                code="\n".join(body) + "\n",
                mark=mark["kind"] if mark else None,
                value=mark["value"] if mark else "",
            )
        )
        i = j + 1
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]


def test_every_block_names_its_language_and_every_mark_its_reason() -> None:
    problems = [f"{b.where}: a code block without a language" for b in ALL_BLOCKS if not b.lang]
    problems += [
        f"{b.where}: not-run without a reason" for b in ALL_BLOCKS if b.mark == "not-run" and not b.value
    ]
    problems += [
        f"{b.where}: file: needs a plain file name"
        for b in ALL_BLOCKS
        if b.mark == "file" and not re.fullmatch(r"[\w.-]+", b.value)
    ]
    assert not problems, "\n".join(problems)


def test_the_docs_have_blocks_that_run() -> None:
    """The extraction finds what the pages hold (a broken fence pattern would run nothing)."""
    run = [b for b in ALL_BLOCKS if b.lang in RUN and b.mark is None]
    assert {b.page.name for b in run} >= {"README.md", "getting-started.md", "own-code.md"}
    assert any(b.lang == "python" for b in run) and any(b.lang == "bash" for b in run)
    assert any(b.lang == "yaml" and b.mark is None for b in ALL_BLOCKS)


# --- YAML study definitions and schedules: the real parser ---------------------------------------

YAML_BLOCKS = [b for b in ALL_BLOCKS if b.lang in CHECKED and b.mark != "not-run"]


def check_yaml(block: Block) -> int:
    """Check a YAML block's definitions and schedules with the real parser; how many it held."""
    documents = [doc for doc in _yaml.load_all(block.code) if doc is not None]
    assert documents, f"{block.where}: an empty YAML block"
    checked = 0
    for document in documents:
        if isinstance(document, dict) and "cron" in document:
            ScheduleCreate.model_validate(document)
            StudyTemplate.model_validate(document["template"])
            checked += 1
        elif isinstance(document, dict) and "search_space" in document:
            StudyDefinition.model_validate(document)
            checked += 1
    return checked


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=[b.where for b in YAML_BLOCKS])
def test_yaml_blocks_are_valid_definitions(block: Block) -> None:
    checked = check_yaml(block)
    # Anything else in YAML (parameter sets for enqueue, ...) is a file a later block uses.
    assert checked or block.mark == "file", (
        f"{block.where}: a YAML block that is neither a study definition nor a schedule: "
        "mark it <!-- file: NAME --> for a block that uses it, or <!-- not-run: reason -->"
    )


def test_the_yaml_check_refuses_a_broken_definition() -> None:
    """The check above can fail: a low above its high, or a bad cron, is refused by the parser."""
    space = "search_space: {lr: {type: float, low: 1, high: 0}}"
    with pytest.raises(ValueError, match="low"):
        check_yaml(Block(ROOT, 1, "yaml", f"name: x\ndirection: maximize\n{space}\n", None, ""))
    with pytest.raises(ValueError, match="cron"):
        check_yaml(Block(ROOT, 1, "yaml", "name: x\ncron: '61 * * * *'\ntemplate: {}\n", None, ""))


# --- links -----------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def test_the_readme_stays_a_front_page() -> None:
    """What caviar is, the two commands, a first study, where to go next; the rest lives in docs/."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "make demo" in text and "make test" in text


def test_readme_relative_links_exist() -> None:
    text = (ROOT / "README.md").read_text()
    targets = [m["target"] for m in LINK.finditer(text)]
    relative = [t for t in targets if not re.match(r"^[a-z]+:", t) and not t.startswith("#")]
    assert len(relative) >= 10, relative  # the README points into docs/
    missing = [t for t in relative if not (ROOT / t.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


REPO_PATH = re.compile(
    r"`(?P<path>(?:caviar|examples|deploy|benchmarks|tests|tools|docs|service|storage|trainer)/[\w./-]*"
    r"|docker-compose\.yml|Dockerfile|Makefile|pyproject\.toml|mkdocs\.yml|\.ci/run)`"
)


def test_repository_paths_named_in_the_docs_exist() -> None:
    """The docs name repository files in code spans (MkDocs cannot link outside docs/): they exist."""
    missing = [
        f"{page.relative_to(ROOT)}: {m['path']}"
        for page in PAGES
        for m in REPO_PATH.finditer(page.read_text())
        if not (ROOT / m["path"]).exists()
    ]
    assert not missing, "\n".join(missing)


DOTTED = re.compile(r"`(?P<name>caviar(?:\.\w+)+)`")


def resolve(name: str) -> object:
    """The module or attribute a dotted name stands for (ImportError / AttributeError if none)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(name)


def test_the_names_on_the_architecture_page_exist() -> None:
    """The package map and the pitfalls name modules and functions: each still exists."""
    names = sorted({m["name"] for m in DOTTED.finditer((ROOT / "docs" / "architecture.md").read_text())})
    assert len(names) >= 20, names
    missing = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"docs/architecture.md names what the code no longer has: {missing}"


# --- python and bash blocks against a live service ------------------------------------------------


@pytest.fixture(scope="module")
def service(databases: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One ``caviar serve`` for the whole module."""
    folder = tmp_path_factory.mktemp("docs-service")
    env = {"CAVIAR_ARTIFACT_DIR": str(folder / "artifacts")}
    server, url = processes.serve(databases.migrated(), env=env, log=folder / "serve.log")
    with server:
        yield url


@pytest.fixture(scope="module")
def shims(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``caviar`` (the console script of pyproject.toml, run by this interpreter) and ``python``."""
    folder = tmp_path_factory.mktemp("bin")
    script = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["caviar"]
    module, function = script.split(":")
    caviar = folder / "caviar"
    caviar.write_text(
        f"#!/bin/sh\nexec '{sys.executable}' -c "
        f'\'import sys; sys.argv[0] = "caviar"; from {module} import {function}; sys.exit({function}())\' "$@"\n'
    )
    caviar.chmod(0o755)
    (folder / "python").symlink_to(sys.executable)
    (folder / "python3").symlink_to(sys.executable)
    return folder


def reset(url: str) -> None:
    """No studies, no schedules: each page starts from an empty service."""
    with httpx.Client(base_url=url, timeout=30) as http:
        for schedule in http.get("/api/v1/schedules").raise_for_status().json()["items"]:
            http.delete(f"/api/v1/schedules/{schedule['id']}").raise_for_status()
        for study in http.get("/api/v1/studies", params={"limit": 1000}).raise_for_status().json()["items"]:
            http.delete(f"/api/v1/studies/{study['name']}").raise_for_status()


def workspace(folder: Path) -> Path:
    """A working folder with the repository's top level in it (links; ``examples/`` copied)."""
    folder.mkdir()
    for entry in ROOT.iterdir():
        if entry.name in {".git", "site"} or entry.name.startswith(("caviar.db", "caviar-")):
            continue
        if entry.name == "examples":
            shutil.copytree(entry, folder / entry.name)
        else:
            (folder / entry.name).symlink_to(entry)
    return folder


def run_block(block: Block, url: str, cwd: Path, bin_dir: Path) -> None:
    address = url.removeprefix("http://")
    code = re.sub(r"(?<![\w.])(localhost|127\.0\.0\.1):8000", address, block.code)
    env = {k: v for k, v in os.environ.items() if k not in {"CAVIAR_DATABASE_URL", "CAVIAR_API_TOKEN"}}
    env.update(CAVIAR_URL=url, PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", COLUMNS="200")
    command = [sys.executable, "-"] if block.lang == "python" else ["bash", "-euo", "pipefail", "-s"]
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(code, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        output = f"(no end after {BLOCK_TIMEOUT_S} s)"
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # anything the block left running
        process.wait()
    shown = f"{block.where} ({block.lang})\n{block.code}\n--- output ---\n{output[-4000:]}"
    assert process.returncode == 0, f"exit {process.returncode}: {shown}"
    assert not ERROR_ENVELOPE.search(output), f"an error answer: {shown}"


RUN_PAGES = [page for page in PAGES if any(b.lang in RUN and b.mark is None for b in blocks(page))]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES, ids=[str(p.relative_to(ROOT)) for p in RUN_PAGES])
def test_page_blocks_run(page: Path, service: str, shims: Path, tmp_path: Path) -> None:
    reset(service)
    cwd = workspace(tmp_path / "work")
    for block in blocks(page):
        if block.mark == "file":
            (cwd / block.value).write_text(block.code)
        elif block.mark is None and block.lang in RUN:
            run_block(block, service, cwd, shims)
