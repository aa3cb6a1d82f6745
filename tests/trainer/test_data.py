"""Dataset loading, splitting, normalisation and errors."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sklearn.datasets
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from caviar.trainer import Dataset, DatasetError, load_dataset
from caviar.trainer._data import BUNDLED, _load_bundled, stratified_split


def test_digits_shapes_and_image_shape(digits: Dataset) -> None:
    assert digits.X_train.shape == (1437, 64) and digits.X_val.shape == (360, 64)
    assert digits.X_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert (digits.n_classes, digits.n_features, digits.image_shape) == (10, 64, (1, 8, 8))


def test_normalisation_fitted_on_training_split_only(digits: Dataset) -> None:
    raw = load_digits()
    x_tr, x_va, _, _ = train_test_split(
        raw.data, raw.target, test_size=0.2, stratify=raw.target, random_state=0
    )
    assert torch.allclose(digits.mean, torch.tensor(x_tr.mean(axis=0), dtype=torch.float32), atol=1e-5)
    std = x_tr.std(axis=0)
    std[std < 1e-8] = 1.0
    assert torch.allclose(digits.std, torch.tensor(std, dtype=torch.float32), atol=1e-5)
    # The training split is standardised exactly; the validation split only approximately.
    assert digits.X_train.mean(0).abs().max() < 1e-5
    assert not torch.allclose(
        digits.mean, torch.tensor(raw.data.mean(axis=0), dtype=torch.float32), atol=1e-4
    )
    expected_val = (x_va - x_tr.mean(axis=0)) / std
    assert np.allclose(digits.X_val.numpy(), expected_val, atol=1e-5)


def test_split_is_stratified_and_seeded() -> None:
    a = load_dataset("wine", seed=0)
    b = load_dataset("wine", seed=0)
    c = load_dataset("wine", seed=1)
    assert torch.equal(a.X_val, b.X_val) and not torch.equal(a.X_val, c.X_val)
    train_frac = torch.bincount(a.y_train) / len(a.y_train)
    val_frac = torch.bincount(a.y_val) / len(a.y_val)
    assert (train_frac - val_frac).abs().max() < 0.05


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_datasets_are_scikit_learns_arrays(name: str) -> None:
    bunch = getattr(sklearn.datasets, f"load_{name}")()
    x, y = _load_bundled(name)
    assert x.dtype == np.float64 and np.array_equal(x, bunch.data)
    assert np.array_equal(y, bunch.target)


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(2, 40), min_size=2, max_size=6),
    validation_split=st.floats(0.05, 0.6),
    seed=st.integers(0, 2**31 - 1),
)
def test_the_stratified_split_picks_scikit_learns_rows(
    counts: list[int], validation_split: float, seed: int
) -> None:
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    n_val = math.ceil(validation_split * len(labels))
    assume(len(counts) <= n_val <= len(labels) - len(counts))
    rows = np.arange(len(labels))
    expected_train, expected_val = train_test_split(
        rows, test_size=validation_split, stratify=labels, random_state=seed
    )
    train, val = stratified_split(labels, validation_split, seed)
    assert np.array_equal(train, expected_train) and np.array_equal(val, expected_val)


def test_a_bundled_dataset_loads_without_importing_scikit_learn() -> None:
    """A worker slot pays for torch's import only (scikit-learn's is about as long again)."""
    code = "import sys; from caviar.trainer import load_dataset; load_dataset('digits'); print('sklearn' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        == "False\n"
    )


def test_builtin_tabular_and_synthetic() -> None:
    cancer = load_dataset("breast_cancer")
    assert cancer.n_classes == 2 and cancer.image_shape is None and cancer.n_features == 30
    synth = load_dataset("synthetic", n_samples=1000, n_features=10, n_classes=4, seed=3)
    assert synth.X_train.shape == (800, 10) and synth.n_classes == 4
    default = load_dataset("synthetic")
    assert len(default.X_train) + len(default.X_val) == 20_000 and default.n_features == 40


def _frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(60, 3)), columns=["a", "b", "c"])
    frame["label"] = np.repeat(["cat", "dog", "emu"], 20)
    return frame


def test_csv_npz_and_parquet_files(tmp_path: Path) -> None:
    frame = _frame()
    frame.to_csv(tmp_path / "d.csv", index=False)
    csv = load_dataset(tmp_path / "d.csv", target="label")
    assert (csv.n_features, csv.n_classes, csv.classes) == (3, 3, ("cat", "dog", "emu"))
    frame.to_parquet(tmp_path / "d.parquet")
    parquet = load_dataset(str(tmp_path / "d.parquet"), target="label")
    assert torch.equal(parquet.X_train, csv.X_train)
    np.savez(tmp_path / "d.npz", X=frame[["a", "b", "c"]].to_numpy(), y=np.repeat([0, 1, 2], 20))
    npz = load_dataset(tmp_path / "d.npz")
    assert torch.allclose(npz.X_train, csv.X_train) and npz.n_classes == 3


def test_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "missing.csv")
    frame = _frame()
    frame.to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DatasetError, match="no target column 'target'"):
        load_dataset(tmp_path / "d.csv")
    frame.loc[3, "b"] = np.nan
    frame.to_csv(tmp_path / "nan.csv", index=False)
    with pytest.raises(ValueError, match="NaN"):
        load_dataset(tmp_path / "nan.csv", target="label")
    np.savez(tmp_path / "one.npz", X=np.ones((20, 2)), y=np.zeros(20))
    with pytest.raises(ValueError, match="single class"):
        load_dataset(tmp_path / "one.npz")
    np.savez(tmp_path / "bad.npz", features=np.ones((20, 2)))
    with pytest.raises(ValueError, match="needs arrays 'X' and 'y'"):
        load_dataset(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="validation_split"):
        load_dataset("wine", validation_split=1.5)
    with pytest.raises(ValueError, match="unexpected options"):
        load_dataset("wine", n_samples=10)
