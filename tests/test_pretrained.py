"""`pretrained`: a backbone that starts from a weights file (exactly), stays untouched while
frozen (batch-norm statistics included), changes when fine-tuned, resumes across its phases; the
offline ImageNet message; and in a DVC project, a new weights file reruns pretrained alone, and
the model trains, evaluates, registers and answers with `weights: none` and with a file."""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from imgpipe.checkpoints import TrainingCheckpoint
from imgpipe.models.pretrained import (
    BACKBONES,
    MODEL_TYPE,
    PretrainedParams,
    backbone_of,
    keras_cache_file,
    weights_record,
)
from imgpipe.params import ParamsError, parse_params
from imgpipe.runtime import StageError
from tests.support import (
    command_env,
    copy_project,
    digits_split,
    fit,
    free_port,
    load_repo_params,
    run,
    stages_run,
)

SIDE = 32  # both backbone families' smallest input
BACKBONE = "MobileNetV3SmallMinimalistic"  # the smallest backbone: seconds per epoch here


def section(**changes: Any) -> PretrainedParams:
    """params.yaml's pretrained section, small and quick, with changes."""
    values = {
        **load_repo_params()["pretrained"],
        "backbone": BACKBONE,
        "weights": "none",
        "frozen": {"epochs": 1, "learning_rate": 0.01},
        "fine_tune": {"epochs": 1, "learning_rate": 0.01},
        "batch_size": 32,
        "precision": "float32",
        "label_smoothing": 0.0,
    }
    return PretrainedParams.model_validate({**values, **changes})


def rgb_digits(images: np.ndarray) -> np.ndarray:
    """(N, 8, 8, 1) digits as (N, 32, 32, 3): each pixel a 4x4 block, in three channels."""
    scale = SIDE // images.shape[1]
    return np.repeat(np.repeat(np.repeat(images, scale, 1), scale, 2), 3, 3)


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """64 training and 32 validation digits at 32x32 RGB."""
    split = digits_split(64, 32)
    return {k: rgb_digits(v) if k.startswith("x") else v for k, v in split.items()}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """A backbone (random weights, distinctive batch-norm statistics) saved to a .weights.h5
    file, and its weights."""
    return save_backbone(tmp_path_factory.mktemp("weights") / "backbone.weights.h5", seed=1)


def save_backbone(path: Path, seed: int) -> tuple[Path, list[np.ndarray]]:
    """A freshly built backbone of BACKBONE at 32x32, its moving statistics set to random values
    (so that any batch-norm update shows), saved to path; returns path and its weights."""
    import keras

    keras.utils.set_random_seed(seed)
    backbone = MODEL_TYPE.backbone((SIDE, SIDE, 3), section())
    rng = np.random.default_rng(seed)
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, layer.moving_variance.shape))
    backbone.save_weights(path)
    return path, [np.asarray(w) for w in backbone.weights]


def backbone_weights(model: Any) -> list[tuple[str, np.ndarray]]:
    """(variable path, value) of each weight of a pretrained model's backbone, in order."""
    return [(w.path, np.asarray(w)) for w in backbone_of(model).weights]


def train(digits: dict[str, np.ndarray], params: PretrainedParams, **options: Any) -> Any:
    """A TrainResult of pretrained on the digits, seed 0."""
    return fit("pretrained", params, **digits, num_classes=10, seed=0, **options)


@pytest.fixture(scope="module")
def straight(digits: dict[str, np.ndarray], weights_file: tuple[Path, list[np.ndarray]]) -> Any:
    """One frozen and two fine-tuning epochs from the weights file, without a stop."""
    params = section(weights=str(weights_file[0]), fine_tune={"epochs": 2, "learning_rate": 0.01})
    return train(digits, params)


# --------------------------------------------------------------------------- the backbone


def test_the_model_starts_from_exactly_the_files_weights(
    weights_file: tuple[Path, list[np.ndarray]],
) -> None:
    path, saved = weights_file
    built = MODEL_TYPE.build((SIDE, SIDE, 3), 10, section(weights=str(path)))
    loaded = backbone_of(built).weights
    assert len(loaded) == len(saved)
    for variable, value in zip(loaded, saved, strict=True):
        np.testing.assert_array_equal(np.asarray(variable), value, err_msg=variable.path)
    random_start = MODEL_TYPE.build((SIDE, SIDE, 3), 10, section(weights="none"))
    differ = [
        not np.array_equal(np.asarray(v), s)
        for v, s in zip(backbone_of(random_start).weights, saved, strict=True)
    ]
    assert sum(differ) > len(saved) // 2  # weights none is not the file by accident


@pytest.mark.slow
def test_the_frozen_phase_changes_no_backbone_weight_and_fine_tuning_does(
    digits: dict[str, np.ndarray], weights_file: tuple[Path, list[np.ndarray]], straight: Any
) -> None:
    path, saved = weights_file
    frozen = train(
        digits, section(weights=str(path), fine_tune={"epochs": 0, "learning_rate": 1.0})
    )
    assert len(frozen.history["loss"]) == 1
    after_frozen = backbone_weights(frozen.model)
    for (name, value), expected in zip(after_frozen, saved, strict=True):
        np.testing.assert_array_equal(value, expected, err_msg=f"frozen phase changed {name}")
    head = frozen.model.get_layer("probabilities").get_weights()[0]
    assert np.abs(head).sum() > 0  # the head did train

    after_fine_tune = backbone_weights(straight.model)
    changed = {
        name
        for (name, value), expected in zip(after_fine_tune, saved, strict=True)
        if not np.array_equal(value, expected)
    }
    kernels = {name for name, _ in after_fine_tune if name.endswith("kernel")}
    batch_norm = {name for name, _ in after_fine_tune if "_bn/" in name}  # statistics included
    assert kernels and any("moving_mean" in name for name in batch_norm)
    assert kernels <= changed, f"fine-tuning left kernels unchanged: {sorted(kernels - changed)}"
    # frozen, in inference mode: Keras 3 would pass fit's training flag into the backbone
    assert not batch_norm & changed, f"fine-tuning changed {sorted(batch_norm & changed)[:4]}"


class TrainingKilledError(Exception):
    """Stands for a killed training run."""


def stop_after(epoch_to_stop: int) -> Any:
    """An on_epoch_end that ends training once epoch `epoch_to_stop` (from 0) has been trained
    and reported, before its checkpoint is saved."""

    def on_epoch_end(epoch: int, logs: dict[str, float]) -> None:
        if epoch == epoch_to_stop:
            raise TrainingKilledError(f"killed after epoch {epoch + 1}")

    return on_epoch_end


@pytest.mark.slow
def test_a_run_stopped_at_each_phase_resumes_to_the_straight_runs_weights(
    digits: dict[str, np.ndarray],
    weights_file: tuple[Path, list[np.ndarray]],
    straight: Any,
    tmp_path: Path,
) -> None:
    params = section(weights=str(weights_file[0]), fine_tune={"epochs": 2, "learning_rate": 0.01})
    checkpoint = TrainingCheckpoint(tmp_path / "checkpoint", "fingerprint")
    # stopped in the first fine-tuning epoch: the checkpoint holds the frozen phase only
    with pytest.raises(TrainingKilledError, match="killed after epoch 2"):
        train(digits, params, checkpoint=checkpoint, on_epoch_end=stop_after(1))
    # resumed into the fine-tuning phase, stopped in its second epoch: one fine-tuned epoch kept
    with pytest.raises(TrainingKilledError, match="killed after epoch 3"):
        train(digits, params, checkpoint=checkpoint, on_epoch_end=stop_after(2))
    assert checkpoint.load().epochs_done == 2
    resumed = train(digits, params, checkpoint=checkpoint)
    assert resumed.resumed_from_epoch == 2
    assert resumed.history == straight.history
    for a, b in zip(resumed.model.get_weights(), straight.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["MobileNetV3Small", "EfficientNetV2B0"])
def test_each_backbone_round_trips_through_its_keras_file(backbone: str, tmp_path: Path) -> None:
    import keras

    keras.utils.set_random_seed(0)
    model = MODEL_TYPE.build((SIDE, SIDE, 3), 3, section(backbone=backbone))
    pixels = np.random.default_rng(0).integers(0, 256, (4, SIDE, SIDE, 3), dtype=np.uint8)
    MODEL_TYPE.save(model, tmp_path / "model.keras")
    loaded = MODEL_TYPE.load(tmp_path / "model.keras")  # safe mode: no code from the file
    expected = MODEL_TYPE.predict_proba(model, pixels, batch_size=4)
    np.testing.assert_allclose(MODEL_TYPE.predict_proba(loaded, pixels, 4), expected, atol=1e-6)
    assert np.allclose(expected.sum(axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- ImageNet weights


def test_the_imagenet_file_names_are_the_ones_keras_asks_for() -> None:
    from keras.src.applications import efficientnet_v2, mobilenet_v3

    for name, backbone in BACKBONES.items():
        stem = backbone.imagenet_file
        if name.startswith("MobileNetV3"):
            assert backbone.base_url == mobilenet_v3.BASE_WEIGHT_PATH
            key = stem.removeprefix("weights_mobilenet_v3_").removesuffix("_no_top_v2.h5")
            assert key in mobilenet_v3.WEIGHTS_HASHES, name
            assert key.startswith(backbone.function.removeprefix("MobileNetV3").lower())
            assert ("minimalistic" in key) == dict(backbone.options).get("minimalistic", False)
        else:
            assert backbone.base_url == efficientnet_v2.BASE_WEIGHTS_PATH
            function = getattr(efficientnet_v2, backbone.function)
            keras_name = inspect.signature(function).parameters["name"].default
            assert stem == f"{keras_name}_notop.h5", name


def test_offline_imagenet_stops_before_any_work_naming_the_file_and_where_it_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    from imgpipe.training import train_model

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    # offline: every download goes to a proxy port that nothing listens on
    for variable in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(variable, f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urlopen keeps the opener (and the proxies) of its first call: a new one reads these, and
    # the one made here is dropped afterwards, when the variables are back
    urllib.request.install_opener(None)
    request.addfinalizer(lambda: urllib.request.install_opener(None))
    raw = load_repo_params()
    raw["models"] = {"pretrained": "rgb64"}
    raw["pretrained"]["weights"] = "imagenet"
    raw["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    backbone = BACKBONES[raw["pretrained"]["backbone"]]
    cached = tmp_path / "keras" / "models" / backbone.imagenet_file
    assert keras_cache_file(backbone.imagenet_file) == cached
    with pytest.raises(StageError, match=re.escape(backbone.imagenet_file)) as raised:
        train_model(
            "pretrained",
            parse_params(raw),
            tables_dir=tmp_path / "no-tables",  # never read: the weights are checked first
            out_dir=tmp_path / "model",
            checkpoint_dir=None,
        )
    message = str(raised.value)
    assert "\n" not in message
    assert backbone.imagenet_file in message
    assert backbone.imagenet_url in message
    assert f"put it at {cached}" in message
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "model").exists()
    # once the file is where the message says, it is used as it is: nothing is downloaded
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"the downloaded file")
    start = MODEL_TYPE.starting_point(
        section(weights="imagenet", backbone=raw["pretrained"]["backbone"])
    )
    assert start == {
        "weights": "imagenet",
        "weights_sha256": hashlib.sha256(b"the downloaded file").hexdigest(),
    }


# --------------------------------------------------------------------------- params, records


def test_a_view_the_backbone_cannot_take_is_refused_with_params() -> None:
    raw = load_repo_params()
    raw["models"] = {"pretrained": "rgb32", "dense": "gray96"}
    assert parse_params(raw).models["pretrained"] == "rgb32"
    raw["views"]["small"] = {"height": 16, "width": 16, "color": "rgb"}
    raw["models"] = {"pretrained": "small"}
    with pytest.raises(ParamsError, match=r"pretrained needs an RGB view of at least 32x32"):
        parse_params(raw)
    raw["models"] = {"pretrained": "gray96"}
    with pytest.raises(ParamsError, match=r"got 96x96x1"):
        parse_params(raw)


def test_weights_must_be_imagenet_none_or_a_weights_file() -> None:
    with pytest.raises(ValueError, match="must be imagenet, none, or the path"):
        section(weights="resnet")
    with pytest.raises(ValueError, match=r"warmup_epochs .* must be less than fine_tune\.epochs"):
        section(warmup_epochs=1.0, frozen={"epochs": 2, "learning_rate": 0.1})
    with pytest.raises(ValueError, match="at least 1"):
        section(
            frozen={"epochs": 0, "learning_rate": 0.1},
            fine_tune={"epochs": 0, "learning_rate": 0.1},
        )


def test_the_weights_record_changes_with_the_files_bytes_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    folder = Path("weights")
    folder.mkdir()
    (folder / "a.weights.h5").write_bytes(b"first")
    first = weights_record(section(weights="weights/a.weights.h5"), folder)
    assert first == {
        "weights": "weights/a.weights.h5",
        "sha256": hashlib.sha256(b"first").hexdigest(),
    }
    assert weights_record(section(weights="weights/a.weights.h5"), folder) == first
    (folder / "a.weights.h5").write_bytes(b"second")
    assert weights_record(section(weights="weights/a.weights.h5"), folder) != first
    assert weights_record(section(weights="none"), folder) == {"weights": "none"}
    assert weights_record(section(weights="imagenet"), folder)["file"].endswith(".h5")
    with pytest.raises(StageError, match="not found: `dvc pull` it"):
        weights_record(section(weights="weights/missing.weights.h5"), folder)
    (tmp_path / "elsewhere.weights.h5").write_bytes(b"x")
    with pytest.raises(StageError, match=r"is not under weights/.*move the file into weights/"):
        weights_record(section(weights="elsewhere.weights.h5"), folder)


# --------------------------------------------------------------------------- in a DVC project


def answers(repo: Path) -> list[str]:
    """The labels the logged pyfunc model of train@pretrained's run gives four test images;
    checks the model is registered."""
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    run_id = json.loads((repo / "models/pretrained/mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=uri)
    versions = client.search_model_versions("name='imgpipe-pretrained'")
    assert run_id in {version.run_id for version in versions}
    try:
        mlflow.set_tracking_uri(uri)
        loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    finally:
        mlflow.set_tracking_uri(None)
    batch = np.random.default_rng(0).integers(0, 256, (4, SIDE, SIDE, 3), dtype=np.uint8)
    predictions = loaded.unwrap_python_model().predict(None, batch)
    assert np.allclose(predictions.filter(like="p_").sum(axis=1), 1.0, atol=1e-4)
    return list(predictions["label"])


def logged_start(repo: Path) -> tuple[dict[str, str], dict[str, str]]:
    """meta.json's `start` and the MLflow run's start.* params of models/pretrained."""
    from mlflow.tracking import MlflowClient

    meta = json.loads((repo / "models/pretrained/meta.json").read_text())
    run_id = json.loads((repo / "models/pretrained/mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    params = client.get_run(run_id).data.params
    return meta["start"], {k: v for k, v in params.items() if k.startswith("start.")}


def set_weights(repo: Path, value: str) -> None:
    """pretrained.weights in the project's params.yaml."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrained"]["weights"] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_in_dvc_a_new_weights_file_reruns_pretrained_alone_and_each_model_answers(
    tmp_path: Path,
) -> None:
    repo, env = tmp_path / "project", command_env()
    repo.mkdir()
    copy_project(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["split"]["max_per_class"] = 12
    params["views"] = {
        "rgb32": {"height": SIDE, "width": SIDE, "color": "rgb"},
        "gray8": {"height": 8, "width": 8, "color": "grayscale"},
    }
    params["models"] = {"pretrained": "rgb32", "logreg": "gray8"}  # logreg: must not rerun
    params["pretrained"] = section().model_dump()
    params["evaluate"]["bootstrap"] = 100
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "project copy"], repo, env)

    # weights: none
    ran = stages_run(run(["dvc", "repro"], repo, env))
    assert {"weights", "train@pretrained", "evaluate@pretrained", "train@logreg"} <= ran
    assert set(answers(repo)) <= {str(d) for d in range(10)}
    assert logged_start(repo) == ({"weights": "none"}, {"start.weights": "none"})

    # a weights file, dvc-added as docs/pipeline.md says
    file = repo / "weights" / "backbone.weights.h5"
    save_backbone(file, seed=1)
    run(["dvc", "add", "weights/backbone.weights.h5"], repo, env)
    set_weights(repo, "weights/backbone.weights.h5")
    ran = stages_run(run(["dvc", "repro"], repo, env))
    assert ran == {"weights", "train@pretrained", "evaluate@pretrained"}
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    expected = {"weights": "weights/backbone.weights.h5", "weights_sha256": digest}
    assert logged_start(repo) == (expected, {f"start.{k}": v for k, v in expected.items()})
    assert set(answers(repo)) <= {str(d) for d in range(10)}

    # the same path, new bytes: only pretrained retrains
    save_backbone(file, seed=2)
    run(["dvc", "add", "weights/backbone.weights.h5"], repo, env)
    ran = stages_run(run(["dvc", "repro"], repo, env))
    assert ran == {"weights", "train@pretrained", "evaluate@pretrained"}
    new_digest = hashlib.sha256(file.read_bytes()).hexdigest()
    assert new_digest != digest and logged_start(repo)[0]["weights_sha256"] == new_digest
    assert stages_run(run(["dvc", "repro"], repo, env)) == set()
    assert "up to date" in run(["dvc", "status"], repo, env)
