"""Typed, validated view of params.yaml: loaded once per stage, refused early when wrong."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from imgpipe.images import PILLOW_MODES, channel_count
from imgpipe.registry import model_types
from imgpipe.runtime import StageError
from imgpipe.sections import Section


class ParamsError(StageError, ValueError):
    """params.yaml is missing, malformed or holds a value the pipeline cannot use."""


class DataParams(Section):
    raw: str = Field(min_length=1)


class Ratios(Section):
    train: float = Field(gt=0, lt=1)
    val: float = Field(ge=0, lt=1)
    test: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> Ratios:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class SplitParams(Section):
    seed: int
    ratios: Ratios
    max_per_class: int | None = Field(ge=1)


class ViewParams(Section):
    height: int = Field(ge=1, le=4096)
    width: int = Field(ge=1, le=4096)
    color: Literal[tuple(PILLOW_MODES)]  # type: ignore[valid-type]

    @property
    def channels(self) -> int:
        """Number of colour channels: 1 for grayscale, 3 for RGB."""
        return channel_count(self.color)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Pixel array shape of one image, (H, W, C)."""
        return (self.height, self.width, self.channels)


class TabulateParams(Section):
    # local: forked worker processes on this machine; ray: Ray Data on the cluster RAY_ADDRESS
    # names, or a local Ray (the `ray` extra). The tables are the same either way.
    engine: Literal["local", "ray"]
    workers: int = Field(ge=0)
    rows_per_group: int = Field(ge=1)


class TrainParams(Section):
    seed: int
    # a train or val table whose pixels (uncompressed, in MB of 10^6 bytes) exceed this is
    # streamed by row group instead of read whole; 0 = stream every table
    stream_over_mb: int = Field(ge=0)
    # rows in the seeded shuffle buffer that a streamed train table passes through
    shuffle_rows: int = Field(ge=0)
    # what Keras models train on: auto (every GPU, data-parallel when there are several; else
    # the one GPU or the CPU) or N (the first N GPUs; without GPUs, the CPU split into N logical
    # devices, to try data-parallel training on any machine)
    devices: Literal["auto"] | int

    @field_validator("devices", mode="before")
    @classmethod
    def _auto_or_a_count(cls, value: object) -> object:
        if value == "auto" or (type(value) is int and value >= 1):
            return value
        raise PydanticCustomError("devices", "must be auto or a number of devices, 1 or more")


class EvaluateParams(Section):
    batch_size: int = Field(ge=1)
    grid_images: int = Field(ge=1, le=64)
    bootstrap: int = Field(ge=100)  # resamples behind the 95 % intervals


class TrackingParams(Section):
    experiment: str = Field(min_length=1)
    uri: str | None
    # an MLflow server that cannot be reached when a stage starts: stop at once, or log into the
    # local sqlite store instead
    on_unreachable: Literal["fail", "local"]


class PipelineParams(Section):
    """The sections of params.yaml that are not a model's own."""

    data: DataParams
    split: SplitParams
    views: dict[str, ViewParams] = Field(min_length=1)
    tabulate: TabulateParams
    models: dict[str, str] = Field(min_length=1)  # model name -> view name
    train: TrainParams
    evaluate: EvaluateParams
    tracking: TrackingParams

    @model_validator(mode="after")
    def _models_are_known_and_use_known_views(self) -> PipelineParams:
        known = model_types()
        for model_name, view_name in self.models.items():
            if model_name not in known:
                raise ValueError(
                    f"models.{model_name}: unknown model; known models: {', '.join(known)} "
                    "(docs/architecture.md 'Adding a model' says how to add one)"
                )
            if view_name not in self.views:
                raise ValueError(
                    f"models.{model_name} names view {view_name!r}; "
                    f"defined views: {', '.join(sorted(self.views))}"
                )
            problem = known[model_name].view_problem(self.views[view_name].shape)
            if problem:
                raise ValueError(f"models.{model_name}: {problem}")
        return self

    def model_section(self, model_name: str) -> Section:
        """The params section of one model (params.yaml `<model_name>:`)."""
        if model_name not in model_types():
            raise ParamsError(
                f"unknown model {model_name!r}; known models: {', '.join(model_types())}"
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


# The whole of params.yaml: the pipeline's sections plus one section per registered model type,
# validated by that type's own params class (imgpipe/models/<name>.py).
Params = create_model(
    "Params",
    __base__=PipelineParams,
    __doc__="The whole of params.yaml.",
    **{name: (entry.params_class, ...) for name, entry in model_types().items()},
)


def _format_error(error: dict[str, Any], raw: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        parent = _lookup_model(error["loc"][:-1])
        valid = ", ".join(parent.model_fields) if parent else "see docs/params.md"
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
            "Fix them in params.yaml (or in your `dvc exp run -S` values); docs/params.md "
            "lists every key."
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
