"""The trained model as an MLflow pyfunc: the wrapper that `mlflow models serve` and load_model
run, and the call that logs it (with the imgpipe package itself) into the active run."""

from __future__ import annotations

from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models.model import ModelInfo


def log_pyfunc_model(model_file: Path, meta_file: Path) -> ModelInfo:
    """mlflow.pyfunc.log_model into the active run: the classifier wrapper, its files, and the
    imgpipe package itself, so that `mlflow models serve` and load_model work wherever keras,
    tensorflow, scikit-learn and mlflow are installed."""
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=ImageClassifierModel(),
        artifacts={"model": str(model_file), "meta": str(meta_file)},
        pip_requirements=_requirements(),
        code_paths=[str(Path(__file__).resolve().parents[1])],  # imgpipe/, not imgpipe/tracking/
    )


def _requirements() -> list[str]:
    """Pins (name==version) of the packages the logged model needs, as installed here."""
    from importlib.metadata import version

    names = [
        "imgpipe",
        "keras",
        "tensorflow",
        "numpy",
        "pandas",
        "pillow",
        "scikit-learn",
        "mlflow",
    ]
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={version(name)}")
        except Exception:  # not installed as a distribution: leave it to the environment
            continue
    return pins


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper around imgpipe.classifier.Classifier.

    Input: a uint8 array (N, H, W, C) in the model's view, or a DataFrame with an `image`
    column of encoded image bytes (or base64 text, as in a JSON serving request). Output: for
    arrays, `label`, `probability` and one `p_<class>` column per class; for images, `label`,
    `probability` and `error`, one row per input row (see imgpipe.serving). Concurrent calls
    (a server's request threads) share forward passes.
    """

    # MLflow wraps predict() for type-hint validation and warns when it has no hints; its input
    # is an array or a DataFrame, and a hint would make MLflow enforce one of them
    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the weights and meta.json from the logged artifacts."""
        from imgpipe.classifier import Classifier
        from imgpipe.serving import BatchedPredictor

        self.classifier = Classifier.from_files(
            context.artifacts["model"], context.artifacts["meta"]
        )
        self.batched = BatchedPredictor(self.classifier.predict_proba)
        # TensorFlow traces the forward pass for the first two batch sizes it meets (0.4 to
        # 0.5 s each), then for any size: done here, not in the first requests' answer times
        for count in (1, 2):
            self.classifier.predict_proba(np.zeros((count, *self.classifier.input_shape), np.uint8))

    # No type hints here: MLflow would turn them into a strict input schema.
    def predict(self, context, model_input, params=None):
        """Classify a batch of images."""
        from imgpipe.serving import answer_rows

        names = self.classifier.meta.class_names
        if isinstance(model_input, np.ndarray):
            proba = self.classifier.predict_proba(model_input)
            frame = pd.DataFrame(proba, columns=[f"p_{n}" for n in names])
            frame.insert(0, "label", [names[i] for i in proba.argmax(axis=1)])
            frame.insert(1, "probability", proba.max(axis=1))
            return frame
        return answer_rows(
            pd.DataFrame(model_input),
            decode=self.classifier.decode,
            predict=self.batched,
            class_names=names,
        )
