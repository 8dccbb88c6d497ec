"""Tests for params loading: the repo's params.yaml loads; every kind of bad value is refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from imgpipe.params import Params, ParamsError, load_params, parse_params
from imgpipe.registry import model_types

MODEL_NAMES = tuple(model_types())  # one module each in imgpipe/models/

KERAS_OPTIMIZERS = ("adam", "adamax", "rmsprop", "sgd")
NUMPY_OPTIMIZERS = ("sgd", "momentum", "adam")


def _refusal(raw: dict[str, Any]) -> str:
    """The ParamsError message for a mapping that must be refused."""
    with pytest.raises(ParamsError, match=r"^params\.yaml has \d+ problem\(s\):") as caught:
        parse_params(raw)
    return str(caught.value)


def _problem_lines(message: str) -> list[str]:
    return [line.strip()[2:] for line in message.splitlines() if line.strip().startswith("- ")]


def _first_view(raw: dict[str, Any]) -> str:
    return next(iter(raw["views"]))


# --------------------------------------------------------------------------- the real file


def test_repo_params_yaml_loads(repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml")
    assert isinstance(params, Params)
    ratios = params.split.ratios
    assert ratios.train + ratios.val + ratios.test == pytest.approx(1.0)
    for model_name, view_name in params.models.items():
        assert model_name in MODEL_NAMES
        assert params.view_of(model_name) is params.views[view_name]
        assert params.model_section(model_name) is getattr(params, model_name)
    for view in params.views.values():
        assert view.shape == (view.height, view.width, view.channels)
        assert view.channels == (1 if view.color == "grayscale" else 3)


def test_repo_params_match_what_parse_params_sees(repo_params: dict[str, Any]) -> None:
    params = parse_params(repo_params)
    assert params.data.raw == repo_params["data"]["raw"]
    assert set(params.views) == set(repo_params["views"])
    assert params.tabulate.workers == repo_params["tabulate"]["workers"]


def test_loaded_params_are_frozen(repo_params: dict[str, Any]) -> None:
    params = parse_params(repo_params)
    with pytest.raises(pydantic.ValidationError, match="Instance is frozen"):
        params.dense.epochs = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    "ratios",
    [
        {"train": 0.8, "val": 0.1, "test": 0.2},  # 1.1
        {"train": 0.6, "val": 0.1, "test": 0.1},  # 0.8
        {"train": 0.5, "val": 0.25, "test": 0.2},  # 0.95
    ],
)
def test_ratios_must_sum_to_one(repo_params: dict[str, Any], ratios: dict[str, float]) -> None:
    repo_params["split"]["ratios"] = ratios
    message = _refusal(repo_params)
    assert "split.ratios" in message
    assert "sum to 1" in message


def test_ratios_that_sum_to_one_with_float_error_are_accepted(repo_params: dict[str, Any]) -> None:
    repo_params["split"]["ratios"] = {"train": 0.7, "val": 0.2, "test": 0.1}  # 0.99999...
    assert parse_params(repo_params).split.ratios.val == 0.2


def _set_view(key: str, value: Any) -> Callable[[dict[str, Any]], str]:
    def edit(raw: dict[str, Any]) -> str:
        view = _first_view(raw)
        raw["views"][view][key] = value
        return f"views.{view}.{key}"

    return edit


def _set(section: str, key: str, value: Any) -> Callable[[dict[str, Any]], str]:
    def edit(raw: dict[str, Any]) -> str:
        raw[section][key] = value
        return f"{section}.{key}"

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        _set_view("height", 0),
        _set_view("width", -3),
        _set("dense", "epochs", 0),
        _set("cnn", "epochs", -1),
        _set("numpy_mlp", "batch_size", 0),
        _set("cnn", "head_units", -1),
        _set("tabulate", "rows_per_group", 0),
        _set("tabulate", "workers", -1),
        _set("split", "max_per_class", 0),
        _set("evaluate", "batch_size", 0),
        _set("dense", "learning_rate", 0.0),
    ],
    ids=lambda edit: edit.__qualname__,
)
def test_non_positive_sizes_are_refused(
    repo_params: dict[str, Any], edit: Callable[[dict[str, Any]], str]
) -> None:
    key = edit(repo_params)
    message = _refusal(repo_params)
    assert key in message


@pytest.mark.parametrize(
    ("section", "key", "bad"),
    [
        ("dense", "hidden_units", [512, 0]),
        ("cnn", "filters", [32, -64]),
        ("numpy_mlp", "hidden_units", []),
    ],
)
def test_layer_sizes_must_be_positive(
    repo_params: dict[str, Any], section: str, key: str, bad: list[int]
) -> None:
    repo_params[section][key] = bad
    message = _refusal(repo_params)
    assert section in message
    assert key in message


@pytest.mark.parametrize(
    ("section", "key", "bad", "valid"),
    [
        ("dense", "optimizer", "adagrad", KERAS_OPTIMIZERS),
        ("cnn", "optimizer", "momentum", KERAS_OPTIMIZERS),
        ("numpy_mlp", "optimizer", "rmsprop", NUMPY_OPTIMIZERS),
        ("cnn", "pooling", "max", ("global_average", "flatten")),
        ("cnn", "precision", "float16", ("float32", "mixed_bfloat16")),
        ("numpy_mlp", "init", "glorot", ("he", "xavier")),
        ("tracking", "on_unreachable", "offline", ("fail", "local")),
    ],
)
def test_unknown_choice_lists_valid_values(
    repo_params: dict[str, Any], section: str, key: str, bad: str, valid: tuple[str, ...]
) -> None:
    repo_params[section][key] = bad
    message = _refusal(repo_params)
    assert f"{section}.{key}" in message
    assert repr(bad) in message
    for choice in valid:
        assert repr(choice) in message


def test_unknown_color_lists_valid_colors(repo_params: dict[str, Any]) -> None:
    view = _first_view(repo_params)
    repo_params["views"][view]["color"] = "sepia"
    message = _refusal(repo_params)
    assert f"views.{view}.color" in message
    assert "'grayscale'" in message
    assert "'rgb'" in message


def test_unknown_flip_lists_valid_values(repo_params: dict[str, Any]) -> None:
    repo_params["cnn"]["augment"]["flip"] = "diagonal"
    message = _refusal(repo_params)
    assert "cnn.augment.flip" in message
    for choice in ("none", "horizontal", "vertical", "horizontal_and_vertical"):
        assert repr(choice) in message


@pytest.mark.parametrize(
    ("path", "wrong", "right", "sibling"),
    [
        (("dense",), "epoch", "epochs", "learning_rate"),
        ((), "trian", "train", "tabulate"),
        (("split", "ratios"), "validation", "val", "test"),
        (("cnn", "augment"), "flp", "flip", "zoom"),
        (("tabulate",), "worker", "workers", "rows_per_group"),
    ],
)
def test_misspelt_key_lists_valid_keys(
    repo_params: dict[str, Any], path: tuple[str, ...], wrong: str, right: str, sibling: str
) -> None:
    section = repo_params
    for part in path:
        section = section[part]
    section[wrong] = section.pop(right)
    message = _refusal(repo_params)
    key = ".".join((*path, wrong))
    misspelt_line = next(line for line in _problem_lines(message) if line.startswith(f"{key}:"))
    assert "unknown key" in misspelt_line
    assert right in misspelt_line
    assert sibling in misspelt_line


def test_misspelt_key_inside_a_view_lists_view_keys(repo_params: dict[str, Any]) -> None:
    view = _first_view(repo_params)
    repo_params["views"][view]["colour"] = repo_params["views"][view].pop("color")
    message = _refusal(repo_params)
    assert f"views.{view}.colour" in message
    line = next(line for line in _problem_lines(message) if "colour" in line)
    for key in ("height", "width", "color"):
        assert key in line.split("colour", 1)[1]


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("dense", "epochs", "5"),
        ("tabulate", "workers", "2"),
        ("split", "seed", 4.2),
        ("cnn", "batch_size", True),
        ("cnn", "batch_norm", "yes"),
        ("dense", "learning_rate", "0.001"),
    ],
)
def test_wrong_type_is_refused_not_coerced(
    repo_params: dict[str, Any], section: str, key: str, value: Any
) -> None:
    repo_params[section][key] = value
    message = _refusal(repo_params)
    assert f"{section}.{key}" in message
    assert repr(value) in message


def test_model_naming_an_unknown_view_is_refused(repo_params: dict[str, Any]) -> None:
    model_name = next(iter(repo_params["models"]))
    repo_params["models"][model_name] = "no_such_view"
    message = _refusal(repo_params)
    line = next(line for line in _problem_lines(message) if "no_such_view" in line)
    assert f"models.{model_name}" in line
    for view in repo_params["views"]:
        assert view in line
    # the message points at the key; it does not echo the whole params file back
    assert "hidden_units" not in message
    assert len(line) < 300


def test_unknown_model_name_lists_known_models(repo_params: dict[str, Any]) -> None:
    repo_params["models"]["resnet"] = _first_view(repo_params)
    message = _refusal(repo_params)
    assert "models.resnet" in message
    assert "Adding a model" in message  # where to read how to add one
    for model_name in MODEL_NAMES:
        assert model_name in message


def test_every_problem_is_reported_at_once(repo_params: dict[str, Any]) -> None:
    repo_params["dense"]["epochs"] = 0
    repo_params["cnn"]["pooling"] = "max"
    repo_params["tabulate"]["workerz"] = 1
    message = _refusal(repo_params)
    lines = _problem_lines(message)
    for key in ("dense.epochs", "cnn.pooling", "tabulate.workerz"):
        assert sum(line.startswith(key) for line in lines) == 1


def test_missing_section_is_named(repo_params: dict[str, Any]) -> None:
    del repo_params["tabulate"]
    message = _refusal(repo_params)
    assert "tabulate" in message
    assert "missing" in message


def test_params_that_are_not_a_mapping_are_refused() -> None:
    with pytest.raises(ParamsError, match="mapping"):
        parse_params(["data", "split"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- files and lookups


def test_load_params_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_load_params_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("data: [unclosed\n", encoding="utf-8")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)


def test_load_params_reads_a_variation(tmp_path: Path, repo_params: dict[str, Any]) -> None:
    repo_params["dense"]["epochs"] = 3
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(repo_params), encoding="utf-8")
    assert load_params(path).dense.epochs == 3


def test_lookups_of_unknown_models_name_the_known_ones(repo_params: dict[str, Any]) -> None:
    params = parse_params(repo_params)
    with pytest.raises(ParamsError, match="unknown model 'resnet'; known models: ") as caught:
        params.model_section("resnet")
    for model_name in MODEL_NAMES:
        assert model_name in str(caught.value)

    listed = next(iter(repo_params["models"]))
    del repo_params["models"][listed]
    params = parse_params(repo_params)
    with pytest.raises(
        ParamsError, match=f"model '{listed}' is not listed under `models:`"
    ) as caught:
        params.view_of(listed)
    for model_name in repo_params["models"]:
        assert model_name in str(caught.value)
