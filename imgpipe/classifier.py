"""Any trained model behind one interface: load it from its folder, classify pixels or files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe.images import check_image, decode_image

META_FILE = "meta.json"
KERAS_FILE = "model.keras"
NUMPY_FILE = "model.npz"


@dataclass(frozen=True)
class ModelMeta:
    """What a saved model needs besides its weights: its name, kind, input view and classes."""

    model: str  # dense, cnn, numpy_mlp
    kind: str  # keras or numpy
    view: str
    height: int
    width: int
    color: str
    class_names: list[str]

    def to_json(self) -> dict[str, Any]:
        """Plain dict for meta.json."""
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> ModelMeta:
        """Read back what to_json wrote."""
        return cls(**payload)


class Classifier:
    """Predicts class probabilities for uint8 pixels (N, H, W, C) or encoded image files."""

    def __init__(self, meta: ModelMeta, model: Any) -> None:
        self.meta = meta
        self.model = model

    @classmethod
    def load(cls, model_dir: str | Path) -> Classifier:
        """Load meta.json and the weights from a train stage's output folder."""
        model_dir = Path(model_dir)
        meta_path = model_dir / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} not found: is {model_dir} a folder written by the train stage? "
                "Run `dvc repro` (or `dvc pull`) first."
            )
        meta = ModelMeta.from_json(json.loads(meta_path.read_text()))
        weights = model_dir / (NUMPY_FILE if meta.kind == "numpy" else KERAS_FILE)
        return cls.from_files(weights, meta_path)

    @classmethod
    def from_files(cls, weights_path: str | Path, meta_path: str | Path) -> Classifier:
        """Load from a weights file (model.keras or model.npz) and its meta.json, anywhere."""
        meta = ModelMeta.from_json(json.loads(Path(meta_path).read_text()))
        if meta.kind == "keras":
            import keras  # deferred: the NumPy model and the data stages never load TensorFlow

            model = keras.saving.load_model(weights_path, safe_mode=True)
        elif meta.kind == "numpy":
            from imgpipe.numpy_mlp import NumpyMLP

            model = NumpyMLP.load(weights_path)
        else:
            raise ValueError(f"{meta_path}: unknown model kind {meta.kind!r} (keras or numpy)")
        return cls(meta, model)

    def predict_proba(self, pixels: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """(N, K) probabilities for uint8 pixels (N, H, W, C) of this model's view."""
        expected = (self.meta.height, self.meta.width, 1 if self.meta.color == "grayscale" else 3)
        if pixels.dtype != np.uint8 or pixels.shape[1:] != expected:
            raise ValueError(
                f"expected uint8 pixels (N, {expected}), got {pixels.dtype} {pixels.shape}"
            )
        if self.meta.kind == "keras":
            if len(pixels) == 0:
                return np.zeros((0, len(self.meta.class_names)), dtype=np.float32)
            return np.asarray(self.model.predict(pixels, batch_size=batch_size, verbose=0))
        return self.model.predict_proba(pixels, batch_size=batch_size)

    def decode(self, data: bytes) -> np.ndarray:
        """Decode one encoded image into this model's (H, W, C) uint8 view."""
        return decode_image(
            data, height=self.meta.height, width=self.meta.width, color=self.meta.color
        )

    def classify_bytes(self, images: list[bytes]) -> list[tuple[str, float] | str]:
        """(label, probability) for each encoded image, or the reason it could not be read."""
        results: list[tuple[str, float] | str] = []
        good: list[int] = []
        pixels: list[np.ndarray] = []
        for index, data in enumerate(images):
            problem = check_image(data)
            if problem is None:
                try:
                    pixels.append(self.decode(data))
                    good.append(index)
                    results.append("")
                    continue
                except Exception as error:  # a decoder failure is this file's problem only
                    problem = f"cannot decode: {error}"
            results.append(problem)
        if good:
            proba = self.predict_proba(np.stack(pixels))
            best = proba.argmax(axis=1)
            for slot, index in enumerate(good):
                results[index] = (self.meta.class_names[best[slot]], float(proba[slot, best[slot]]))
        return results
