"""Workers read ``file:`` datasets only under their data root, and never report file contents."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from caviar.trainer import DatasetError, load_dataset
from caviar.worker._trainer import DataFileRefused, data_error, resolve_data_file

SECRET = "CAVIAR_API_TOKEN=s3cr3t-value"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "runs").mkdir(parents=True)
    (data / "runs" / "ok.csv").write_text("a,b,target\n1,2,0\n3,4,1\n")
    (tmp_path / "outside.csv").write_text(f"{SECRET},target\n1,0\n")
    os.symlink(tmp_path / "outside.csv", data / "escape.csv")
    os.symlink(data / "runs" / "ok.csv", data / "alias.csv")
    return data


def test_a_path_under_the_root_resolves(root: Path) -> None:
    assert resolve_data_file(str(root), "runs/ok.csv") == (root / "runs" / "ok.csv").resolve()
    assert resolve_data_file(str(root), "alias.csv") == (root / "runs" / "ok.csv").resolve()


@pytest.mark.parametrize(
    "relative", ["escape.csv", "../outside.csv", "/etc/passwd", "runs/../../outside.csv"]
)
def test_paths_leaving_the_root_are_refused(root: Path, relative: str) -> None:
    with pytest.raises(DataFileRefused):
        resolve_data_file(str(root), relative)


def test_a_missing_file_and_a_file_outside_get_the_same_answer(root: Path) -> None:
    """The answer must not tell whether a file exists outside the root."""
    with pytest.raises(DataFileRefused) as missing:
        resolve_data_file(str(root), "nope.csv")
    with pytest.raises(DataFileRefused) as outside:
        resolve_data_file(str(root), "escape.csv")
    assert str(missing.value).replace("nope.csv", "X") == str(outside.value).replace("escape.csv", "X")


def test_without_a_data_root_no_file_is_read(root: Path) -> None:
    with pytest.raises(DataFileRefused, match="CAVIAR_DATA_DIR"):
        resolve_data_file(None, "runs/ok.csv")


def test_dataset_errors_never_quote_the_file(tmp_path: Path) -> None:
    header = tmp_path / "header.csv"
    header.write_text(f"{SECRET},b\n1,2\n3,4\n")
    with pytest.raises(DatasetError) as no_target:
        load_dataset(header, target="target")
    assert SECRET not in str(no_target.value) and "2 columns" in str(no_target.value)
    text = tmp_path / "text.csv"
    text.write_text(f"a,target\n{SECRET},0\nhunter2,1\n")
    with pytest.raises(DatasetError) as non_numeric:
        load_dataset(text)
    assert SECRET not in str(non_numeric.value) and "hunter2" not in str(non_numeric.value)
    assert str(tmp_path) not in str(non_numeric.value)  # the worker's own paths stay private too


def test_a_parser_error_is_reported_by_its_type_alone(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    import numpy as np

    np.savez(bad, X=np.array([[SECRET, "x"]]), y=np.array([0]))
    with pytest.raises(Exception) as raised:
        load_dataset(bad)
    reason = data_error("file:bad.npz", raised.value)  # type: ignore[arg-type]
    assert SECRET not in reason and reason.startswith("dataset file:bad.npz could not be read (")
