"""`logreg`: logistic regression on flattened pixels (scikit-learn), the classic baseline.

What a model with no hidden layer reaches: a linear function of the pixels, softmax on top.
Fitted by L-BFGS on the whole training table at once, so its history has a single "epoch".
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from imgpipe.registry import EpochCallback, ModelType, TrainingData, TrainResult
from imgpipe.runtime import StageError
from imgpipe.sections import Section

if TYPE_CHECKING:
    from sklearn.linear_model import LogisticRegression

log = logging.getLogger("imgpipe.models.logreg")
FORMAT_VERSION = 1


class LogregParams(Section):
    """params.yaml `logreg:`."""

    c: float = Field(gt=0)  # inverse L2 regularisation strength (scikit-learn's C)
    max_iter: int = Field(ge=1)  # L-BFGS iterations at most


def _features(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, H*W*C) float32 in [-1, 1], as the dense nets see them."""
    flat = pixels.reshape(len(pixels), -1)
    scaled = np.divide(flat, 127.5, dtype=np.float32)
    scaled -= 1
    return scaled


def _scores(model: LogisticRegression, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the model on scaled inputs."""
    from sklearn.metrics import log_loss

    proba = model.predict_proba(x)  # (N, K)
    accuracy = float(np.mean(proba.argmax(axis=1) == y))
    return float(log_loss(y, proba, labels=model.classes_)), accuracy


class LogregType(ModelType):
    """scikit-learn's LogisticRegression; coefficients saved as plain arrays (no pickle)."""

    params_class = LogregParams
    weights_file = "model.npz"

    def fit(
        self, params: LogregParams, data: TrainingData, *, seed: int, on_epoch_end: EpochCallback
    ) -> TrainResult:
        """Fit on every training image at once; report train and val loss and accuracy."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        x_train = _features(data.x_train)  # (N, D) float32
        model = LogisticRegression(C=params.c, max_iter=params.max_iter)  # deterministic
        started = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(x_train, data.y_train)
        seconds = time.perf_counter() - started
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            log.warning(
                "L-BFGS stopped at logreg.max_iter (%d) before converging: raise it for the "
                "exact optimum",
                params.max_iter,
            )
        if len(model.classes_) != data.num_classes:
            raise StageError(
                f"the training table holds {len(model.classes_)} of {data.num_classes} classes: "
                "logistic regression needs an example of each"
            )
        loss, accuracy = _scores(model, x_train, data.y_train)
        logs = {"loss": loss, "accuracy": accuracy}
        if len(data.x_val):
            logs["val_loss"], logs["val_accuracy"] = _scores(
                model, _features(data.x_val), data.y_val
            )
        on_epoch_end(0, logs)
        return TrainResult(
            model=model,
            history={key: [value] for key, value in logs.items()},
            seconds=seconds,
            images_per_second=len(x_train) / max(seconds, 1e-9),
            parameters=int(model.coef_.size + model.intercept_.size),
        )

    def planned_epochs(self, params: LogregParams) -> int:
        """One fit of the whole table: one "epoch" in the history."""
        return 1

    def save(self, model: LogisticRegression, path: Path) -> None:
        """Coefficients, intercepts and classes in an .npz file."""
        config = {"format_version": FORMAT_VERSION, "C": model.C, "max_iter": model.max_iter}
        with Path(path).open("wb") as handle:  # a file handle keeps numpy from adding ".npz"
            np.savez(
                handle,
                config=np.array(json.dumps(config)),
                coef=model.coef_,
                intercept=model.intercept_,
                classes=model.classes_,
            )

    def load(self, path: Path) -> LogisticRegression:
        """A fitted LogisticRegression rebuilt from the saved arrays."""
        from sklearn.linear_model import LogisticRegression

        with np.load(path, allow_pickle=False) as data:
            config = json.loads(str(data["config"]))
            if config.get("format_version") != FORMAT_VERSION:
                raise ValueError(
                    f"{path}: unsupported format_version {config.get('format_version')!r}; "
                    "retrain it: dvc repro train@logreg"
                )
            model = LogisticRegression(C=config["C"], max_iter=config["max_iter"])
            model.coef_ = data["coef"]
            model.intercept_ = data["intercept"]
            model.classes_ = data["classes"]
        model.n_features_in_ = model.coef_.shape[1]
        return model

    def predict_proba(
        self, model: LogisticRegression, pixels: np.ndarray, batch_size: int
    ) -> np.ndarray:
        """Probabilities, batch by batch (one float copy of a batch at a time)."""
        out = np.empty((len(pixels), len(model.classes_)), dtype=np.float32)  # (N, K)
        for start in range(0, len(pixels), batch_size):
            rows = slice(start, start + batch_size)
            out[rows] = model.predict_proba(_features(pixels[rows]))
        return out


MODEL_TYPE = LogregType()
