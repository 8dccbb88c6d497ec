"""Tests for MLflow tracking on a real SQLite store: URIs, runs, tags, metrics, pyfunc model."""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from imgpipe.classifier import Classifier
from imgpipe.model_folder import META_FILE, ModelMeta
from imgpipe.numpy_net import NumpyMLP
from imgpipe.tracking import connection, runs

CLASS_NAMES = ["cat", "dog"]
VIEW = {"view": "gray6x8", "height": 6, "width": 8, "color": "grayscale"}
PARAMS = {
    "model": "dense",
    "dense": {"hidden_units": [32, 16], "dropout": 0.2, "optimizer": "adam"},
    "view": {"name": "gray96", "height": 96},
    "n_train": 100,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One SQLite MLflow store for this module (creating one takes seconds); each test opens its
    own runs. Artifacts land beside it.

    Store.start_run sets MLflow's global tracking URI (and with it MLFLOW_TRACKING_URI); both are
    put back afterwards so that no other test sees this store.
    """
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # a SQLite store's default artifact root is ./mlruns
        patch.setenv("MLFLOW_TRACKING_URI", uri)  # remembered, so restored afterwards
        patch.delenv("DVC_EXP_NAME", raising=False)
        MlflowClient(tracking_uri=uri).search_experiments()  # creates the tables now
        yield uri
        mlflow.set_tracking_uri(None)


def start_run(uri: str, model_name: str = "dense", **overrides: object) -> runs.Run:
    """Store.start_run with test values."""
    kwargs: dict = {
        "model_name": model_name,
        "dataset": "digits",
        "data_hash": "0123456789abcdef",
        "params": PARAMS,
        **overrides,
    }
    return runs.Store(uri, "imgpipe-test").start_run(**kwargs)


# --------------------------------------------------------------------------- tracking_uri


def test_tracking_uri_prefers_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert connection.tracking_uri("sqlite:///configured.db") == "http://mlflow.example:5000"
    assert connection.tracking_uri(None) == "http://mlflow.example:5000"


def test_tracking_uri_uses_params_when_the_environment_has_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert connection.tracking_uri("sqlite:///configured.db") == "sqlite:///configured.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # set but empty counts as unset
    assert connection.tracking_uri("sqlite:///configured.db") == "sqlite:///configured.db"


def test_tracking_uri_defaults_to_sqlite_at_dvc_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.chdir(elsewhere)
    assert connection.tracking_uri(None) == f"sqlite:///{root.resolve() / 'mlflow.db'}"
    assert connection.tracking_uri("") == f"sqlite:///{root.resolve() / 'mlflow.db'}"


def test_tracking_uri_defaults_to_sqlite_in_cwd_outside_dvc(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert connection.tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert connection.repo_root() == tmp_path.resolve()


# --------------------------------------------------------------------------- helpers


def test_flatten_joins_nested_keys_with_dots() -> None:
    nested = {"a": {"b": 1, "c": {"d": [1, 2], "e": None}}, "f": "x", 3: {"g": True}}
    assert runs.flatten("", nested) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "a.c.e": None,
        "f": "x",
        "3.g": True,
    }
    assert runs.flatten("cnn", {"augment": {"flip": "none"}}) == {"cnn.augment.flip": "none"}
    assert runs.flatten("seed", 42) == {"seed": 42}
    assert runs.flatten("", {}) == {}


def test_files_digest_follows_content_not_path_order(tmp_path: Path) -> None:
    first, second = tmp_path / "train.parquet", tmp_path / "val.parquet"
    first.write_bytes(b"train rows")
    second.write_bytes(b"val rows")

    digest = runs.files_digest([first, second])
    assert runs.files_digest([second, first]) == digest
    assert runs.files_digest([str(first), str(second)]) == digest
    assert runs.files_digest([first]) != digest

    second.write_bytes(b"val rowz")
    changed = runs.files_digest([first, second])
    assert changed != digest
    second.write_bytes(b"val rows")
    assert runs.files_digest([first, second]) == digest


def test_files_digest_reads_large_files_whole(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    content = bytearray(3 * (1 << 20) + 5)  # more than one read block
    big.write_bytes(content)
    digest = runs.files_digest([big])
    content[-1] = 1  # a change past the first block
    big.write_bytes(content)
    assert runs.files_digest([big]) != digest


# --------------------------------------------------------------------------- runs


def test_run_start_creates_a_tagged_run_with_flat_params(store: str) -> None:
    run = start_run(store)

    record = MlflowClient(tracking_uri=store).get_run(run.run_id)
    tags = record.data.tags
    assert tags["model"] == "dense"
    assert tags["dataset"] == "digits"
    assert tags["data_hash"] == "0123456789abcdef"
    assert tags["git_commit"] == runs.git_commit()
    assert "dvc_experiment" not in tags
    assert record.info.run_name.startswith("dense-")
    assert record.info.status == "RUNNING"
    experiment = MlflowClient(tracking_uri=store).get_experiment(record.info.experiment_id)
    assert experiment.name == "imgpipe-test"

    assert record.data.params == {
        "model": "dense",
        "dense.hidden_units": "[32, 16]",
        "dense.dropout": "0.2",
        "dense.optimizer": "adam",
        "view.name": "gray96",
        "view.height": "96",
        "n_train": "100",
    }


def test_run_start_names_the_dvc_experiment(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-lobe")
    run = start_run(store, model_name="cnn")

    record = MlflowClient(tracking_uri=store).get_run(run.run_id)
    assert record.data.tags["dvc_experiment"] == "bushy-lobe"
    assert record.data.tags["model"] == "cnn"
    assert record.info.run_name == "cnn-bushy-lobe"


def test_runs_of_one_experiment_share_it(store: str) -> None:
    first, second = start_run(store), start_run(store, model_name="cnn")
    client = MlflowClient(tracking_uri=store)
    experiment_ids = {client.get_run(r.run_id).info.experiment_id for r in (first, second)}
    assert len(experiment_ids) == 1
    assert first.run_id != second.run_id


def test_log_epoch_builds_a_metric_history(store: str) -> None:
    run = start_run(store)
    losses = [1.5, 0.9, 0.4, 0.3]
    for epoch, loss in enumerate(losses):
        run.log_epoch(epoch, {"loss": loss, "accuracy": 0.5 + epoch / 10})

    client = MlflowClient(tracking_uri=store)
    history = sorted(client.get_metric_history(run.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(len(losses)))
    assert [m.value for m in history] == pytest.approx(losses)
    accuracy = client.get_metric_history(run.run_id, "accuracy")
    assert sorted(m.step for m in accuracy) == list(range(len(losses)))


def test_log_metrics_skips_values_that_are_not_finite(store: str) -> None:
    run = start_run(store)
    run.log_metrics({"train_seconds": 12.5, "bad": float("nan"), "worse": float("inf")})
    metrics = MlflowClient(tracking_uri=store).get_run(run.run_id).data.metrics
    assert metrics == {"train_seconds": 12.5}


def test_resume_finds_only_runs_of_this_store(store: str) -> None:
    run = start_run(store)
    assert runs.Store(store, "imgpipe-test").resume_run(uuid.uuid4().hex) is None
    resumed = runs.Store(store, "imgpipe-test").resume_run(run.run_id)
    assert isinstance(resumed, runs.Run)
    assert resumed.run_id == run.run_id
    resumed.log_metrics({"test_accuracy": 0.75})
    metrics = MlflowClient(tracking_uri=store).get_run(run.run_id).data.metrics
    assert metrics["test_accuracy"] == 0.75


@pytest.mark.parametrize("status", ["FINISHED", "FAILED"])
def test_finish_closes_the_run(store: str, status: str) -> None:
    run = start_run(store)
    if status == "FINISHED":
        run.finish()
    else:
        run.finish(status)
    info = MlflowClient(tracking_uri=store).get_run(run.run_id).info
    assert info.status == status
    assert info.end_time is not None


def test_log_file_and_set_tags(store: str, tmp_path: Path) -> None:
    run = start_run(store)
    history = tmp_path / "history.csv"
    history.write_text("epoch,loss\n1,0.5\n")
    run.log_file(history)
    run.set_tags({"stage": "evaluate@dense", "extra": "yes"})
    client = MlflowClient(tracking_uri=store)
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["history.csv"]
    tags = client.get_run(run.run_id).data.tags
    assert (tags["stage"], tags["extra"]) == ("evaluate@dense", "yes")


# --------------------------------------------------------------------------- pyfunc model


def png(pixels: np.ndarray) -> bytes:
    """PNG bytes of an (H, W[, C]) uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def logged_model(store: str, tmp_path: Path) -> tuple[mlflow.pyfunc.PyFuncModel, Classifier]:
    """A NumpyMLP logged with Run.log_model and loaded back from runs:/<id>/model."""
    folder = tmp_path / "models" / "numpy_mlp"
    folder.mkdir(parents=True)
    n_inputs = VIEW["height"] * VIEW["width"]
    NumpyMLP([n_inputs, 8, len(CLASS_NAMES)], output="softmax", init="he", seed=1).save(
        folder / "model.npz"
    )
    meta = ModelMeta(model="numpy_mlp", class_names=CLASS_NAMES, **VIEW)
    (folder / META_FILE).write_text(json.dumps(meta.to_json()))

    run = start_run(store, model_name="numpy_mlp")
    run.log_model(folder / "model.npz", folder / META_FILE)
    run.finish()
    return mlflow.pyfunc.load_model(f"runs:/{run.run_id}/model"), Classifier.load(folder)


def test_logged_model_predicts_on_uint8_pixels(
    logged_model: tuple[mlflow.pyfunc.PyFuncModel, Classifier],
) -> None:
    pyfunc, classifier = logged_model
    pixels = np.random.default_rng(2).integers(
        0, 256, size=(6, VIEW["height"], VIEW["width"], 1), dtype=np.uint8
    )
    # the signature is the clients' `image` column: MLflow's schema check refuses arrays, and
    # Python callers with pixels call the wrapper itself
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"schema .*'image': string"):
        pyfunc.predict(pixels)
    frame = pyfunc.unwrap_python_model().predict(None, pixels)

    expected = classifier.predict_proba(pixels)  # (6, 2)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == ["label", "probability", *(f"p_{n}" for n in CLASS_NAMES)]
    assert len(frame) == len(pixels)
    np.testing.assert_allclose(frame[[f"p_{n}" for n in CLASS_NAMES]].to_numpy(), expected)
    assert list(frame["label"]) == [CLASS_NAMES[i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose(frame["probability"].to_numpy(), expected.max(axis=1))


def test_logged_model_predicts_on_encoded_images(
    logged_model: tuple[mlflow.pyfunc.PyFuncModel, Classifier],
    image_bytes: dict[str, bytes],
    corrupt_bytes: dict[str, bytes],
) -> None:
    pyfunc, classifier = logged_model
    good = [png(np.full((30, 20), 255, dtype=np.uint8)), image_bytes["rgb.jpg"]]
    bad = corrupt_bytes["truncated.jpg"]
    payloads = [good[0], bad, good[1]]
    expected = classifier.classify_bytes(payloads)

    as_bytes = pyfunc.predict(pd.DataFrame({"image": payloads}))
    as_base64 = pyfunc.predict(
        pd.DataFrame({"image": [base64.b64encode(p).decode("ascii") for p in payloads]})
    )

    for frame in (as_bytes, as_base64):
        assert list(frame.columns) == ["label", "probability", "error"]
        assert len(frame) == len(payloads)
        for row, want in zip(frame.itertuples(index=False), expected, strict=True):
            if isinstance(want, str):
                assert row.label is None
                assert pd.isna(row.probability)
                assert row.error == want
            else:
                assert (row.label, row.probability) == (want[0], pytest.approx(want[1]))
                assert row.error is None


def test_logged_model_reports_bad_image_values_per_row(
    logged_model: tuple[mlflow.pyfunc.PyFuncModel, Classifier],
) -> None:
    # one malformed value in a serving request must not fail the other rows
    pyfunc, classifier = logged_model
    good = png(np.zeros((12, 9), dtype=np.uint8))
    values = [
        base64.b64encode(good).decode("ascii"),
        "aGVsbG8",  # not valid base64 (bad padding)
        None,  # a missing value in the request
        good,
    ]

    frame = pyfunc.predict(pd.DataFrame({"image": values}))

    assert list(frame.columns) == ["label", "probability", "error"]
    label, probability = classifier.classify_bytes([good])[0]
    for row in (0, 3):
        assert frame.loc[row, "label"] == label
        assert frame.loc[row, "probability"] == pytest.approx(probability)
        assert frame.loc[row, "error"] is None
    for row in (1, 2):
        assert frame.loc[row, "label"] is None
        assert isinstance(frame.loc[row, "error"], str)
        assert frame.loc[row, "error"]
    assert "base64" in frame.loc[1, "error"].lower()
    assert frame.loc[2, "error"] == "no image in this row"


def test_register_model_adds_one_tagged_version_per_run(store: str, tmp_path: Path) -> None:
    folder = tmp_path / "numpy_mlp"
    folder.mkdir()
    NumpyMLP([VIEW["height"] * VIEW["width"], 4, 2], output="softmax", init="he", seed=3).save(
        folder / "model.npz"
    )
    meta = ModelMeta(model="numpy_mlp", class_names=CLASS_NAMES, **VIEW)
    (folder / META_FILE).write_text(json.dumps(meta.to_json()))
    run = start_run(store, model_name="numpy_mlp")
    run.log_model(folder / "model.npz", folder / META_FILE)
    name = f"registry-test-{uuid.uuid4().hex[:8]}"

    first = run.register_model(name, tags={"test_accuracy": 0.5}, description="first")
    again = run.register_model(name, tags={"test_accuracy": 0.75}, description="again")

    client = MlflowClient(tracking_uri=store)
    versions = client.search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == [first.version] == [again.version]
    version = client.get_model_version(name, first.version)
    assert version.run_id == run.run_id
    assert version.tags["test_accuracy"] == "0.75"
    assert version.description == "again"
    assert client.get_run(run.run_id).data.tags["registered_model"] == f"{name}/{first.version}"
    # the package travels with the model: a serving machine needs no imgpipe install
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{first.version}"))
    assert (local / "code" / "imgpipe" / "classifier.py").is_file()
