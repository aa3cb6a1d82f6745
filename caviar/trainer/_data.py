"""Datasets: loading, stratified splitting and train-split normalisation."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from .spec import DATASETS

__all__ = ["Dataset", "DatasetError", "load_dataset"]


class DatasetError(ValueError):
    """A dataset that cannot be used. Its message never quotes the data (names, values)."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset split into normalised train and validation tensors.

    Attributes:
        name: Dataset name or file path it was loaded from.
        X_train: Normalised training features, float32 ``(n_train, n_features)``.
        y_train: Training labels as class indices, int64 ``(n_train,)``.
        X_val: Validation features, normalised with the training statistics.
        y_val: Validation labels.
        n_classes: Number of classes.
        n_features: Number of input features.
        image_shape: ``(channels, height, width)`` for image datasets (features are the
            flattened image), else ``None``.
        mean: Per-feature mean of the raw training split.
        std: Per-feature standard deviation of the raw training split (1 where constant).
        classes: Original label of each class index.
    """

    name: str
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    n_classes: int
    n_features: int
    image_shape: tuple[int, int, int] | None
    mean: torch.Tensor
    std: torch.Tensor
    classes: tuple[Any, ...]

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        """Normalise raw features with the training statistics."""
        return (features.to(torch.float32) - self.mean) / self.std


def load_dataset(
    name: str | Path,
    validation_split: float = 0.2,
    seed: int = 0,
    *,
    target: str = "target",
    **options: Any,
) -> Dataset:
    """Load a dataset and split it into normalised train/validation tensors.

    Args:
        name: ``"digits"`` (8x8 images), ``"breast_cancer"``, ``"wine"``, ``"synthetic"``, or a path
            to a ``.csv``/``.parquet`` file (with a ``target`` column) or an ``.npz`` file (arrays
            ``X`` and ``y``).
        validation_split: Fraction of samples held out for validation, in ``(0, 1)``.
        seed: Seed of the stratified split (and of the synthetic data).
        target: Label column of CSV/parquet files.
        **options: ``"synthetic"`` only: ``n_samples`` (20000), ``n_features`` (40), ``n_classes``
            (10), ``n_informative`` (30), ``class_sep`` (1.5), ``seed`` override via ``data_seed``.

    Returns:
        The dataset; normalisation statistics are fitted on the training split only.

    Raises:
        DatasetError: Unknown name, a missing file, bad split, missing target column, NaNs, fewer
            than two classes, or options for a dataset that takes none (a ``ValueError``).
    """
    if not isinstance(validation_split, float | int) or not 0 < validation_split < 1:
        raise DatasetError(f"validation_split must be in (0, 1), got {validation_split!r}")
    image_shape: tuple[int, int, int] | None = None
    key = str(name)
    if key == "synthetic":
        x, y = _synthetic(seed=seed, **options)
    elif options:
        raise DatasetError(f"unexpected options for dataset {key!r}: {', '.join(sorted(options))}")
    elif key in BUNDLED:
        x, y = _load_bundled(key)
        if key == "digits":
            image_shape = (1, 8, 8)
    elif Path(key).suffix.lower() in (".csv", ".npz", ".parquet") or Path(key).exists():
        x, y = _load_file(Path(key), target)
        key = Path(key).name  # messages and the dataset's name carry the file's name, not its path
    else:
        raise DatasetError(
            f"unknown dataset {key!r}: use one of {', '.join(DATASETS)} or a .csv/.npz/.parquet path"
        )
    return _split(key, x, y, validation_split, seed, image_shape)


BUNDLED = {
    "digits": ("digits.csv.gz", 0),
    "breast_cancer": ("breast_cancer.csv", 1),
    "wine": ("wine_data.csv", 1),
}
"""scikit-learn's bundled datasets: the file in ``sklearn/datasets/data`` and its header lines."""


def _load_bundled(name: str) -> tuple[NDArray[Any], NDArray[Any]]:
    """A bundled dataset read from scikit-learn's own file (features, then the label, per row), as
    its ``load_<name>()`` reads it, without importing scikit-learn: its import costs about 2 s of
    CPU in every worker slot, as much as torch's (tests/trainer/test_data.py checks the arrays are
    scikit-learn's)."""
    file, header = BUNDLED[name]
    spec = importlib.util.find_spec("sklearn")  # finds the package without running its __init__
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(folders[0], "datasets", "data", file) if folders else None
    if path is None or not path.is_file():  # another layout: scikit-learn's loader
        # lazy: scikit-learn only when its files are not where this version keeps them
        from sklearn import datasets

        bunch = getattr(datasets, f"load_{name}")()
        return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target)
    data = np.loadtxt(path, delimiter=",", skiprows=header, dtype=np.float64)
    return data[:, :-1], data[:, -1].astype(int)


def _synthetic(
    seed: int,
    n_samples: int = 20_000,
    n_features: int = 40,
    n_classes: int = 10,
    n_informative: int = 30,
    class_sep: float = 1.5,
    data_seed: int | None = None,
) -> tuple[NDArray[Any], NDArray[Any]]:
    # lazy: scikit-learn, as above
    from sklearn.datasets import make_classification

    n_informative = min(n_informative, n_features)
    x, y = make_classification(
        n_samples=n_samples,
        n_features=n_features,
        n_informative=n_informative,
        n_redundant=min(2, n_features - n_informative),
        n_classes=n_classes,
        n_clusters_per_class=1,
        class_sep=class_sep,
        flip_y=0.01,
        random_state=seed if data_seed is None else data_seed,
    )
    return x, y


def _load_file(path: Path, target: str) -> tuple[NDArray[Any], NDArray[Any]]:
    # Messages name the problem, never the file's contents (column names, values): a study's
    # author sees them in the trial's fail reason.
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path.name}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("X", "y") if k not in archive.files]
            if missing:
                raise DatasetError(
                    f"{path.name}: .npz needs arrays 'X' and 'y', missing {', '.join(missing)}"
                )
            x, y = archive["X"], archive["y"]
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
            raise DatasetError(
                f"{path.name}: X must be 2-D and y 1-D of the same length, got {x.shape} and {y.shape}"
            )
        return x.astype(np.float64), y
    # lazy: pandas loads only for CSV and Parquet files
    import pandas as pd

    frame = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
    if target not in frame.columns:
        raise DatasetError(
            f"{path.name}: no target column {target!r} (the file has {len(frame.columns)} columns)"
        )
    features = frame.drop(columns=[target])
    non_numeric = [str(c) for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if non_numeric:
        raise DatasetError(f"{path.name}: {len(non_numeric)} feature column(s) are not numeric")
    if frame[target].isna().any():
        raise DatasetError(f"{path.name}: target column {target!r} contains NaN")
    return features.to_numpy(dtype=np.float64), frame[target].to_numpy()


def _split(
    name: str,
    x: NDArray[Any],
    y: NDArray[Any],
    validation_split: float,
    seed: int,
    image_shape: tuple[int, int, int] | None,
) -> Dataset:
    if len(x) == 0 or x.shape[1] == 0:
        raise DatasetError(f"dataset {name!r} is empty (shape {x.shape})")
    if np.isnan(x).any():
        rows, cols = np.nonzero(np.isnan(x))
        raise DatasetError(
            f"dataset {name!r} contains NaN features (first at row {rows[0]}, column {cols[0]})"
        )
    if not np.isfinite(x).all():
        raise DatasetError(f"dataset {name!r} contains infinite features")
    classes, labels = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise DatasetError(f"dataset {name!r} has a single class; need at least 2")
    counts = np.bincount(labels)
    n_val = math.ceil(validation_split * len(labels))
    if counts.min() < 2 or n_val < len(classes) or len(labels) - n_val < len(classes):
        raise DatasetError(
            f"dataset {name!r} is too small for a stratified {validation_split} split "
            f"({len(labels)} samples, smallest class has {counts.min()})"
        )
    train, val = stratified_split(labels, validation_split, seed)
    x_tr, x_va, y_tr, y_va = x[train], x[val], labels[train], labels[val]
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std = np.where(std < 1e-8, 1.0, std)

    def tensor(a: NDArray[Any]) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray((a - mean) / std, dtype=np.float32))

    return Dataset(
        name=name,
        X_train=tensor(x_tr),
        y_train=torch.from_numpy(y_tr.astype(np.int64)),
        X_val=tensor(x_va),
        y_val=torch.from_numpy(y_va.astype(np.int64)),
        n_classes=len(classes),
        n_features=x.shape[1],
        image_shape=image_shape,
        mean=torch.from_numpy(mean.astype(np.float32)),
        std=torch.from_numpy(std.astype(np.float32)),
        classes=tuple(c.item() if hasattr(c, "item") else c for c in classes),
    )


def stratified_split(
    labels: NDArray[Any], validation_split: float, seed: int
) -> tuple[NDArray[Any], NDArray[Any]]:
    """Train and validation row indices of a stratified split of ``labels`` (class indices 0..k-1).

    The rows scikit-learn's ``train_test_split(..., test_size=validation_split, stratify=labels,
    random_state=seed)`` picks, drawn the same way (its StratifiedShuffleSplit), without importing
    scikit-learn in a worker slot; tests/trainer/test_data.py checks they are the same rows.
    """
    n_val = math.ceil(validation_split * len(labels))
    counts = np.bincount(labels)
    by_class = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_train_of = _approximate_mode(counts, len(labels) - n_val, rng)
    n_val_of = _approximate_mode(counts - n_train_of, n_val, rng)
    train: list[Any] = []
    val: list[Any] = []
    for rows, count, n_train, n_v in zip(by_class, counts, n_train_of, n_val_of, strict=True):
        shuffled = rows.take(rng.permutation(count), mode="clip")
        train.extend(shuffled[:n_train])
        val.extend(shuffled[n_train : n_train + n_v])
    return rng.permutation(train), rng.permutation(val)


def _approximate_mode(counts: NDArray[Any], n_draws: int, rng: np.random.RandomState) -> NDArray[Any]:
    """How many of ``n_draws`` to take from each class: the floor of its share, the rest to the
    largest remainders, ties broken at random (scikit-learn's ``_approximate_mode``)."""
    continuous = counts / counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            add = min(len(tied), need)
            floored[rng.choice(tied, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)
