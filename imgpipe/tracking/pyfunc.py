"""The trained model as an MLflow pyfunc: the wrapper that `mlflow models serve` and load_model
run, and the call that logs it into the active run as a model from code (MLflow's "models from
code": a script, imgpipe/tracking/logged_model.py, and the imgpipe package beside it; no pickled
object), with a signature and an input example."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, REQUEST_LIMIT_EXCEEDED
from mlflow.types import ColSpec, Schema

# The script MLflow copies into the logged model and runs at load: mlflow.models.set_model(...)
MODEL_CODE = Path(__file__).with_name("logged_model.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # imgpipe/, bundled as the model's code/

# What clients send and get (see imgpipe.serving): base64 image files in one `image` column; one
# answer per row. Raw bytes in the column pass the string check too (pandas object columns).
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema(
        [
            ColSpec("string", "label", required=False),
            ColSpec("double", "probability", required=False),
            ColSpec("string", "error", required=False),
        ]
    ),
)


def log_pyfunc_model(model_file: Path, meta_file: Path) -> ModelInfo:
    """mlflow.pyfunc.log_model into the active run: the model-from-code script, the weights and
    meta.json as artifacts, the imgpipe package as its code, a signature and an input example, so
    that `mlflow models serve`, `mlflow models predict` and load_model work wherever keras,
    tensorflow, scikit-learn and mlflow are installed."""
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_CODE),
        artifacts={"model": str(model_file), "meta": str(meta_file)},
        pip_requirements=_requirements(),
        code_paths=[str(PACKAGE_DIR)],  # imgpipe/ (MLflow leaves __pycache__ out)
        signature=SIGNATURE,
        # MLflow loads the logged model once and runs it on the example (a failure only warns)
        input_example=input_example(meta_file),
    )


def input_example(meta_file: Path) -> pd.DataFrame:
    """One row as clients send it: a mid-grey PNG of the model's view size, base64-encoded."""
    from PIL import Image

    meta = json.loads(Path(meta_file).read_text(encoding="utf-8"))
    mode = "L" if meta["color"] == "grayscale" else "RGB"
    buffer = io.BytesIO()
    Image.new(
        mode, (int(meta["width"]), int(meta["height"])), 128 if mode == "L" else (128,) * 3
    ).save(buffer, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode("ascii")]})


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

    Input (the signature): a DataFrame with an `image` column of base64 text (as in a JSON
    serving request) or of encoded image bytes. Output: `label`, `probability` and `error`, one
    row per input row (see imgpipe.serving). Concurrent calls (a server's request threads) share
    forward passes. A uint8 array (N, H, W, C) in the model's view is still taken by this class,
    but the signature's schema check refuses arrays before they reach it: call it through
    `unwrap_python_model().predict(None, pixels)`, which answers `label`, `probability` and one
    `p_<class>` column per class.
    """

    # MLflow wraps predict() for type-hint validation and warns when it has no hints; the
    # signature given at logging is the schema
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
        """Classify a batch of images, within the request's bounds (imgpipe.serving)."""
        from imgpipe import serving

        names = self.classifier.meta.class_names
        bounds = serving.current_bounds()  # imgpipe-serve's flags, or the defaults
        try:
            if isinstance(model_input, np.ndarray):
                return serving.answer_pixels(
                    model_input,
                    input_shape=self.classifier.input_shape,
                    predict=self.batched,
                    class_names=names,
                    bounds=bounds,
                )
            return serving.answer_rows(
                pd.DataFrame(model_input),
                decode=self.classifier.decode,
                predict=self.batched,
                class_names=names,
                bounds=bounds,
            )
        except serving.RequestRefusedError as error:  # HTTP 429 from MLflow, 413 from imgpipe-serve
            raise MlflowException(str(error), error_code=REQUEST_LIMIT_EXCEEDED) from None
        except serving.DeadlineExceededError as error:  # HTTP 504
            raise MlflowException(str(error), error_code=DEADLINE_EXCEEDED) from None
