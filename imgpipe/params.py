"""Typed, validated view of params.yaml: loaded once per stage, refused early when wrong."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MODEL_NAMES = ("dense", "cnn", "numpy_mlp")
KERAS_OPTIMIZERS = ("adam", "adamax", "rmsprop", "sgd")


class ParamsError(ValueError):
    """params.yaml is missing, malformed or holds a value the pipeline cannot use."""


class _Section(BaseModel):
    # strict: "5" is not 5; frozen: a loaded config cannot drift; forbid: misspelt keys fail
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataParams(_Section):
    raw: str = Field(min_length=1)


class Ratios(_Section):
    train: float = Field(gt=0, lt=1)
    val: float = Field(ge=0, lt=1)
    test: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> Ratios:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class SplitParams(_Section):
    seed: int
    ratios: Ratios
    max_per_class: int | None = Field(ge=1)


class ViewParams(_Section):
    height: int = Field(ge=1, le=4096)
    width: int = Field(ge=1, le=4096)
    color: Literal["grayscale", "rgb"]

    @property
    def channels(self) -> int:
        """Number of colour channels: 1 for grayscale, 3 for RGB."""
        return 1 if self.color == "grayscale" else 3

    @property
    def shape(self) -> tuple[int, int, int]:
        """Pixel array shape of one image, (H, W, C)."""
        return (self.height, self.width, self.channels)


class TabulateParams(_Section):
    workers: int = Field(ge=0)
    rows_per_group: int = Field(ge=1)


class TrainParams(_Section):
    seed: int


class _Optimised(_Section):
    learning_rate: float = Field(gt=0)
    # exponential: lr * decay_rate ** (step / decay_steps); cosine: from lr down to 0 over the
    # whole run (epochs x batches per epoch), and decay_steps / decay_rate are not used
    schedule: Literal["exponential", "cosine"]
    decay_steps: int = Field(ge=1)
    decay_rate: float = Field(gt=0, le=1)
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)


class DenseParams(_Optimised):
    hidden_units: list[int] = Field(min_length=1)
    dropout: float = Field(ge=0, lt=1)
    flip: Literal["none", "horizontal"]  # random horizontal flips of the training images
    optimizer: Literal["adam", "adamax", "rmsprop", "sgd"]

    @model_validator(mode="after")
    def _positive_units(self) -> DenseParams:
        _check_positive(self.hidden_units, "hidden_units")
        return self


class AugmentParams(_Section):
    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"]
    rotation: float = Field(ge=0, le=1)
    zoom: float = Field(ge=0, lt=1)
    shift: float = Field(ge=0, lt=1)


class CnnParams(_Optimised):
    filters: list[int] = Field(min_length=1)
    convs_per_block: int = Field(ge=1)
    batch_norm: bool
    # weight of the old moving mean/variance at each training step
    batch_norm_momentum: float = Field(gt=0, lt=1)
    pooling: Literal["global_average", "flatten"]
    head_units: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)
    augment: AugmentParams
    optimizer: Literal["adam", "adamax", "rmsprop", "sgd"]
    precision: Literal["float32", "mixed_bfloat16"]

    @model_validator(mode="after")
    def _positive_filters(self) -> CnnParams:
        _check_positive(self.filters, "filters")
        return self


class NumpyMlpParams(_Optimised):
    hidden_units: list[int] = Field(min_length=1)
    dropout: float = Field(ge=0, lt=1)
    flip: Literal["none", "horizontal"]
    output: Literal["softmax", "sigmoid"]
    init: Literal["he", "xavier"]
    optimizer: Literal["sgd", "momentum", "adam"]

    @model_validator(mode="after")
    def _positive_units(self) -> NumpyMlpParams:
        _check_positive(self.hidden_units, "hidden_units")
        return self


class EvaluateParams(_Section):
    batch_size: int = Field(ge=1)
    grid_images: int = Field(ge=1, le=64)


class TrackingParams(_Section):
    experiment: str = Field(min_length=1)
    uri: str | None
    # an MLflow server that cannot be reached when a stage starts: stop at once, or log into the
    # local sqlite store instead
    on_unreachable: Literal["fail", "local"]


class Params(_Section):
    """The whole of params.yaml."""

    data: DataParams
    split: SplitParams
    views: dict[str, ViewParams] = Field(min_length=1)
    tabulate: TabulateParams
    models: dict[Literal["dense", "cnn", "numpy_mlp"], str] = Field(min_length=1)
    train: TrainParams
    dense: DenseParams
    cnn: CnnParams
    numpy_mlp: NumpyMlpParams
    evaluate: EvaluateParams
    tracking: TrackingParams

    @model_validator(mode="after")
    def _models_use_known_views(self) -> Params:
        for model_name, view_name in self.models.items():
            if view_name not in self.views:
                raise ValueError(
                    f"models.{model_name} names view {view_name!r}; "
                    f"defined views: {', '.join(sorted(self.views))}"
                )
        return self

    def model_section(self, model_name: str) -> DenseParams | CnnParams | NumpyMlpParams:
        """The params section of one model."""
        if model_name not in MODEL_NAMES:
            raise ParamsError(
                f"unknown model {model_name!r}; known models: {', '.join(MODEL_NAMES)}"
            )
        return getattr(self, model_name)

    def view_of(self, model_name: str) -> ViewParams:
        """The image view a model trains on."""
        if model_name not in self.models:
            raise ParamsError(
                f"model {model_name!r} is not listed under `models:` in params.yaml; "
                f"listed: {', '.join(self.models)}"
            )
        return self.views[self.models[model_name]]


def _check_positive(values: list[int], name: str) -> None:
    bad = [v for v in values if v < 1]
    if bad:
        raise ValueError(f"{name} must all be >= 1, got {values}")


def _format_error(error: dict[str, Any], raw: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        parent = _lookup_model(error["loc"][:-1])
        valid = ", ".join(parent.model_fields) if parent else "see README"
        return f"{location}: unknown key (valid keys here: {valid})"
    if error["type"] == "missing":
        return f"{location}: required key is missing"
    message = error["msg"]
    if error["type"] == "literal_error":
        message = message.replace("Input should be", "must be one of:")
    if not error["loc"]:  # a whole-file check names its own keys; its input is the whole file
        return message.removeprefix("Value error, ")
    return f"{location}: {message} (got {error.get('input')!r})"


def _lookup_model(location: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class found at a location inside Params, if any."""
    model: Any = Params
    parts = list(location)
    while parts:
        part = parts.pop(0)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = field.annotation
        if getattr(model, "__origin__", None) is dict:
            model = model.__args__[1]  # views.<name>: skip the user's key
            if parts:
                parts.pop(0)
            else:
                return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def parse_params(raw: dict[str, Any]) -> Params:
    """Validate a params mapping; raise ParamsError listing every problem."""
    if not isinstance(raw, dict):
        raise ParamsError("params.yaml must be a mapping of sections (data, split, views, ...)")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        problems = "\n".join(f"  - {_format_error(e, raw)}" for e in error.errors())
        raise ParamsError(
            f"params.yaml has {error.error_count()} problem(s):\n{problems}\n"
            "Fix them in params.yaml (or in your `dvc exp run -S` values); README.md "
            "'Params reference' lists every key."
        ) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path} not found: run the stages from the project root") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {error}") from None
    return parse_params(raw)
