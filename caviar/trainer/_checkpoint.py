"""Saving one member's trained weights and rebuilding it for inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._layers import FusedModel, build_model
from .spec import TrialConfig

__all__ = ["FORMAT", "TrainedModel", "load_model", "save_checkpoint"]

FORMAT = "caviar-trainer-checkpoint/1"


def save_checkpoint(
    path: str | Path, config: TrialConfig, state: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Write a self-contained checkpoint (config, weights, dataset shape and normalisation).

    Args:
        path: Destination file.
        config: The member's config.
        state: The member's parameters and buffers without the member axis.
        meta: ``n_features``, ``n_classes``, ``image_shape``, ``mean``, ``std``, ``classes``.
    """
    payload = {
        "format": FORMAT,
        "config": config.to_params(),
        "state_dict": {name: t.detach().cpu() for name, t in state.items()},
        "n_features": int(meta["n_features"]),
        "n_classes": int(meta["n_classes"]),
        "image_shape": list(meta["image_shape"]) if meta["image_shape"] is not None else None,
        "mean": meta["mean"].detach().cpu(),
        "std": meta["std"].detach().cpu(),
        "classes": list(meta["classes"]),
    }
    torch.save(payload, Path(path))


@dataclass(frozen=True, eq=False)
class TrainedModel:
    """A single trained member, ready for inference on raw (unnormalised) features.

    Attributes:
        config: The config it was trained with.
        model: The rebuilt one-member fused model (eval mode, CPU).
        mean: Training-split feature mean used for normalisation.
        std: Training-split feature standard deviation.
        classes: Original label of each class index.
    """

    config: TrialConfig
    model: FusedModel
    mean: torch.Tensor
    std: torch.Tensor
    classes: tuple[Any, ...]

    @torch.no_grad()
    def predict_proba(self, features: np.ndarray[Any, Any] | torch.Tensor) -> np.ndarray[Any, Any]:
        """Class probabilities ``(n, n_classes)`` for raw features ``(n, n_features)``."""
        x = (torch.as_tensor(np.asarray(features), dtype=torch.float32) - self.mean) / self.std
        logits = self.model(x)[0]
        return torch.softmax(logits, dim=-1).numpy()

    def predict(self, features: np.ndarray[Any, Any] | torch.Tensor) -> np.ndarray[Any, Any]:
        """Predicted original labels for raw features ``(n, n_features)``."""
        index = self.predict_proba(features).argmax(axis=1)
        return np.asarray(self.classes, dtype=object if isinstance(self.classes[0], str) else None)[index]


def load_model(path: str | Path) -> TrainedModel:
    """Rebuild a member saved with :meth:`TrialResult.save` for inference.

    Raises:
        FileNotFoundError: Missing file.
        ValueError: Not a caviar trainer checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a caviar trainer checkpoint")
    config = TrialConfig.from_params(payload["config"])
    shape = payload["image_shape"]
    image_shape = (int(shape[0]), int(shape[1]), int(shape[2])) if shape is not None else None
    model = build_model(
        config.model,
        1,
        payload["n_features"],
        payload["n_classes"],
        image_shape,
        config.layers,
        config.hidden_units,
        config.batch_norm,
    )
    model.load_state_dict({name: t.unsqueeze(0) for name, t in payload["state_dict"].items()})
    model.eval()
    return TrainedModel(config, model, payload["mean"], payload["std"], tuple(payload["classes"]))
