"""Any trained model behind one interface: load it from its folder, classify pixels or files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe.images import channel_count, decode_checked
from imgpipe.model_folder import ModelFolder, ModelMeta


def best_labels(proba: np.ndarray, class_names: Sequence[str]) -> list[tuple[str, float]]:
    """(label, probability) of the most probable class of each row of (N, K) probabilities."""
    best = proba.argmax(axis=1)
    return [(class_names[b], float(proba[row, b])) for row, b in enumerate(best)]


class Classifier:
    """Predicts class probabilities for uint8 pixels (N, H, W, C) or encoded image files."""

    def __init__(self, meta: ModelMeta, model: Any) -> None:
        self.meta = meta
        self.model = model
        self.model_type = meta.model_type

    @classmethod
    def load(cls, model_dir: str | Path) -> Classifier:
        """Load meta.json and the weights from a train stage's output folder."""
        folder = ModelFolder(model_dir)
        meta = folder.meta()
        return cls(meta, meta.model_type.load(folder.weights_path(meta)))

    @classmethod
    def from_files(cls, weights_path: str | Path, meta_path: str | Path) -> Classifier:
        """Load from a weights file and its meta.json, anywhere (e.g. MLflow's artifacts)."""
        meta = ModelMeta.read(meta_path)
        return cls(meta, meta.model_type.load(Path(weights_path)))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the pixels this model reads."""
        return (self.meta.height, self.meta.width, channel_count(self.meta.color))

    def predict_proba(self, pixels: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """(N, K) probabilities for uint8 pixels (N, H, W, C) of this model's view."""
        if pixels.dtype != np.uint8 or pixels.shape[1:] != self.input_shape:
            raise ValueError(
                f"expected uint8 pixels (N, {self.input_shape}), got {pixels.dtype} {pixels.shape}"
            )
        if len(pixels) == 0:
            return np.zeros((0, len(self.meta.class_names)), dtype=np.float32)
        return self.model_type.predict_proba(self.model, pixels, batch_size)

    def decode(self, data: bytes) -> np.ndarray | str:
        """One encoded image as this model's (H, W, C) uint8 view, or why it cannot be read."""
        return decode_checked(
            data, height=self.meta.height, width=self.meta.width, color=self.meta.color
        )

    def classify_bytes(self, images: list[bytes]) -> list[tuple[str, float] | str]:
        """(label, probability) for each encoded image, or the reason it could not be read."""
        decoded = [self.decode(data) for data in images]
        good = [index for index, pixels in enumerate(decoded) if not isinstance(pixels, str)]
        results: list[tuple[str, float] | str] = [
            pixels if isinstance(pixels, str) else "" for pixels in decoded
        ]
        if good:
            proba = self.predict_proba(np.stack([decoded[index] for index in good]))
            for index, answer in zip(good, best_labels(proba, self.meta.class_names), strict=True):
                results[index] = answer
        return results
