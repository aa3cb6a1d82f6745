"""The supervisor's start-up checks, in this process: which slots start, and the directories and
code options every slot gets (the supervision of slot processes is in test_worker.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from caviar.worker._options import WorkerOptions
from caviar.worker._supervisor import _checked_code_options, _checked_directories, discover_slots


def test_gpu_lists_name_visible_gpus_once_per_slot_and_skip_empty_parts() -> None:
    assert discover_slots("0, 1,", 2, 0, available=2) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert discover_slots("1", 1, None, available=2) == ["cuda:1"]  # a GPU slot: no CPU slot
    assert discover_slots("none", 3, 0) == []
    with pytest.raises(ValueError, match=r"GPU 2 is not visible \(2 visible\)"):
        discover_slots("0,2", 1, 0, available=2)
    with pytest.raises(ValueError, match=r"GPU -1 is not visible"):
        discover_slots("-1", 1, 0, available=2)
    with pytest.raises(ValueError, match=r"--gpus must be all, none or a list like 0,1 \(got 'one'\)"):
        discover_slots("one", 1, 0, available=2)


def test_the_code_and_work_directories_become_absolute_and_the_workdir_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "code").mkdir()
    checked = _checked_directories(WorkerOptions(code_dir="code", workdir="runs/here"))
    assert checked.code_dir == str(tmp_path / "code")
    assert checked.workdir == str(tmp_path / "runs" / "here")
    assert (tmp_path / "runs" / "here").is_dir()
    # defaults: the directory the worker starts in, no work directory
    plain = _checked_directories(WorkerOptions())
    assert plain.code_dir == str(tmp_path) and plain.workdir is None


def test_a_bad_code_or_work_directory_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"^--code-dir .*missing: not a directory$"):
        _checked_directories(WorkerOptions(code_dir=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match=r"^--workdir .*file.sub: cannot make it: Not a directory$"):
        _checked_directories(WorkerOptions(code_dir=str(tmp_path), workdir=str(tmp_path / "file" / "sub")))


def test_code_options_are_checked_and_say_what_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="caviar.worker")
    none = _checked_code_options(WorkerOptions(code_dir=str(tmp_path)))
    assert none.code_dir == str(tmp_path) and none.pins == {}
    assert caplog.text == ""
    some = _checked_code_options(
        WorkerOptions(code_dir=str(tmp_path), allow_code=("python:mypkg",), pass_env=("HOME",))
    )
    assert some.pass_env == ("HOME",) and some.code_dir == str(tmp_path)
    assert "runs only this code" in caplog.text and "ANY program" not in caplog.text
    caplog.clear()
    _checked_code_options(WorkerOptions(code_dir=str(tmp_path), allow_code=("all",)))
    assert "--allow-code all: this worker runs ANY program" in caplog.text
    with pytest.raises(ValueError):
        _checked_code_options(WorkerOptions(code_dir=str(tmp_path), allow_code=("nonsense",)))
    assert os.path.isabs(some.code_dir or "")
