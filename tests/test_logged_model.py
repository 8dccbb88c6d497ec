"""The logged MLflow model and the training checkpoint hold no code from elsewhere: the model is
logged from code (no pickle) with a signature and an input example that `mlflow models predict`
runs; a checkpoint made by other code, or one that cannot be restored, makes training start over
instead of resuming or failing."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import subprocess
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from imgpipe.checkpoints import ROOT as CODE_ROOT
from imgpipe.checkpoints import (
    TrainingCheckpoint,
    code_changes,
    code_digest,
    code_files,
)
from imgpipe.model_folder import META_FILE, ModelMeta
from imgpipe.params import Params
from imgpipe.registry import model_type
from imgpipe.tracking import runs
from tests.support import (
    BIN,
    ROOT,
    checkpoint_epochs,
    command_env,
    copy_project,
    digits_split,
    fit,
    free_port,
    kill_when,
    load_repo_params,
    run_stage_subprocess,
    start_stage,
    train_command,
    write_train_project,
)
from tests.team_support import serving

DIGITS = [str(d) for d in range(10)]
# the first bytes of a pickle of protocol 2 or later (0x80 PROTO n); cloudpickle writes 4 or 5
PICKLE_HEADERS = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))


@dataclass(frozen=True)
class Logged:
    """A digits model logged by Run.log_model into a SQLite store, and its files downloaded."""

    uri: str  # the tracking URI
    model_uri: str  # runs:/<id>/model
    folder: Path  # the logged model's files, downloaded


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory, params: Params) -> Iterator[Logged]:
    """numpy_mlp trained for a few epochs on 8x8 digits, logged as the train stage logs it."""
    folder = tmp_path_factory.mktemp("logged_model")
    section = params.model_section("numpy_mlp").model_copy(
        update={"hidden_units": [16], "epochs": 5}
    )
    result = fit("numpy_mlp", section, **digits_split(400, 100), num_classes=10, seed=0)
    model_dir = folder / "numpy_mlp"
    model_dir.mkdir()
    weights = model_dir / model_type("numpy_mlp").weights_file
    model_type("numpy_mlp").save(result.model, weights)
    meta = ModelMeta("numpy_mlp", "gray8", 8, 8, "grayscale", DIGITS)
    (model_dir / META_FILE).write_text(json.dumps(meta.to_json()))
    uri = f"sqlite:///{folder}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # a SQLite store's default artifact root is ./mlruns
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("DVC_EXP_NAME", raising=False)
        run = runs.Store(uri, "logged-model").start_run(
            model_name="numpy_mlp", dataset="digits", data_hash="0" * 16, params={"a": 1}
        )
        run.log_model(weights, model_dir / META_FILE)
        run.finish()
        assert run.unlogged == []
        model_uri = f"runs:/{run.run_id}/model"
        local = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(folder / "download"))
        yield Logged(uri, model_uri, Path(local))
        mlflow.set_tracking_uri(None)


def pickled_files(folder: Path) -> list[str]:
    """Files under folder that are pickles by name or by their first bytes."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with path.open("rb") as handle:
            head = handle.read(2)
        if path.suffix in (".pkl", ".pickle") or head in PICKLE_HEADERS:
            found.append(path.relative_to(folder).as_posix())
    return found


# --------------------------------------------------------------------------- the logged model


def test_the_logged_model_holds_no_pickle(logged: Logged, tmp_path: Path) -> None:
    files = {p.relative_to(logged.folder).as_posix() for p in logged.folder.rglob("*")}
    assert {"MLmodel", "logged_model.py", "artifacts/model.npz", "artifacts/meta.json"} <= files
    assert "code/imgpipe/tracking/pyfunc.py" in files  # the package travels with the model
    assert "python_model.pkl" not in files
    assert pickled_files(logged.folder) == []
    flavor = yaml.safe_load((logged.folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(flavor["model_code_path"]).name == "logged_model.py"
    assert "python_model" not in flavor
    # the check finds a cloudpickle-style file (what log_model wrote before) by its bytes alone
    (tmp_path / "python_model").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    (tmp_path / "weights.npz").write_bytes((logged.folder / "artifacts/model.npz").read_bytes())
    assert pickled_files(tmp_path) == ["python_model"]


def test_it_loads_with_pickle_loading_off_and_answers_its_input_example(
    logged: Logged, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # a pickle would fail
    model = mlflow.pyfunc.load_model(logged.model_uri)
    schema = model.metadata.get_input_schema()
    assert schema.input_names() == ["image"]
    assert [spec.type.name for spec in schema.inputs] == ["string"]
    example = model.input_example
    assert list(example.columns) == ["image"] and len(example) == 1
    answer = model.predict(example)
    assert list(answer.columns) == ["label", "probability", "error"]
    assert answer.loc[0, "label"] in DIGITS and answer.loc[0, "error"] is None


@pytest.mark.slow
def test_mlflow_models_predict_runs_on_the_input_example(logged: Logged) -> None:
    example = logged.folder / "serving_input_example.json"
    assert json.loads(example.read_text())["dataframe_split"]["columns"] == ["image"]
    command = [str(BIN / "mlflow"), "models", "predict", "-m", logged.model_uri]
    result = subprocess.run(
        [*command, "-i", str(example), "--env-manager", "local"],
        env={**command_env(), "MLFLOW_TRACKING_URI": logged.uri},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads(result.stdout.strip().splitlines()[-1])["predictions"]
    assert len(predictions) == 1
    assert predictions[0]["label"] in DIGITS and predictions[0]["error"] is None


@pytest.mark.slow
@pytest.mark.parametrize("server", ["imgpipe-serve", "mlflow models serve"])
def test_both_servers_answer_the_input_example_and_refuse_a_request_without_images(
    logged: Logged, server: str, tmp_path: Path
) -> None:
    port = free_port()
    address = ["--host", "127.0.0.1", "--port", str(port)]
    if server == "imgpipe-serve":
        args = [str(BIN / "imgpipe-serve"), logged.model_uri, *address]
    else:
        args = [str(BIN / "mlflow"), "models", "serve", "-m", logged.model_uri, *address]
        args += ["--env-manager", "local", "--workers", "1"]
    env = {**command_env(), "MLFLOW_TRACKING_URI": logged.uri}
    url = f"http://127.0.0.1:{port}"
    example = (logged.folder / "serving_input_example.json").read_bytes()
    no_images = json.dumps({"dataframe_split": {"columns": ["img"], "data": [["x"]]}}).encode()
    with serving(args, cwd=tmp_path, env=env, ready_url=f"{url}/ping", timeout=240):
        status, body = post_json(f"{url}/invocations", example)
        assert status == 200, body
        (answer,) = json.loads(body)["predictions"]
        assert answer["label"] in DIGITS and answer["error"] is None
        status, body = post_json(f"{url}/invocations", no_images)
    # the signature names the column: MLflow's schema check refuses the request, in one line
    assert status == 400, body
    assert "missing inputs ['image']" in json.loads(body)["message"]


def post_json(url: str, body: bytes) -> tuple[int, bytes]:
    """POST a JSON body: (status, response body), whatever the status."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_the_installed_keras_has_the_safe_mode_fixes_pyproject_requires() -> None:
    """keras>=3.11: earlier releases have known ways around safe_mode, which loads .keras files
    without running the Python code they may carry."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (keras,) = [Requirement(d) for d in project["dependencies"] if d.startswith("keras")]
    assert keras.specifier.contains("3.11.0") and not keras.specifier.contains("3.10.9")
    assert keras.specifier.contains(version("keras")), version("keras")


# --------------------------------------------------------------------------- the code digest


def test_the_code_digest_covers_the_modules_dvc_yaml_lists_for_train() -> None:
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    listed = [str(dep) for dep in dvc["stages"]["train"]["do"]["deps"]]
    models = yaml.safe_load((ROOT / "params.yaml").read_text())["models"]
    covered: set[str] = set()
    for model in models:
        deps = {dep.replace("${key}", model) for dep in listed if dep.endswith(".py")}
        files = set(code_files(["stages.train", "imgpipe.training", f"imgpipe.models.{model}"]))
        assert files <= deps, f"train@{model}: dvc.yaml lacks {sorted(files - deps)}"
        assert set(code_digest(model)) == files | {"keras", "tensorflow", "numpy"}
        covered |= files
    # the one listed module no stage imports: the script MLflow runs when it loads the model
    every = {dep.replace("${key}", m) for dep in listed if dep.endswith(".py") for m in models}
    assert every - covered == {"imgpipe/tracking/logged_model.py"}


def test_a_changed_module_changes_the_digest_and_a_module_that_shapes_no_model_does_not(
    tmp_path: Path,
) -> None:
    for name in ("imgpipe", "stages"):
        shutil.copytree(CODE_ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__py*"))
    before = code_digest("dense", root=tmp_path)
    assert before == code_digest("dense")  # the copy is this code
    with (tmp_path / "imgpipe" / "runtime.py").open("a") as handle:
        handle.write("# how outputs are written, not what they hold\n")
    assert code_digest("dense", root=tmp_path) == before
    with (tmp_path / "imgpipe" / "keras_training.py").open("a") as handle:
        handle.write("# one more line\n")
    after = code_digest("dense", root=tmp_path)
    assert code_changes(before, after) == ["imgpipe/keras_training.py changed"]
    assert code_changes(before, {**after, "keras": "9.0"}) == [
        "imgpipe/keras_training.py changed",
        f"keras {before['keras']} -> 9.0",
    ]


ARRAYS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}


def test_a_checkpoint_of_other_code_is_not_resumed_and_says_which(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = {"imgpipe/models/dense.py": "aaaa", "imgpipe/devices.py": "bbbb", "keras": "3.11.0"}
    saved = TrainingCheckpoint(tmp_path / "ckpt", "params", code=old)
    saved.extra = {"run_id": "r1"}
    saved.save(2, {"loss": [1.0, 0.5]}, ARRAYS, seconds=3.0)

    same = TrainingCheckpoint(tmp_path / "ckpt", "params", code=dict(old))
    assert same.saved_extra() == {"run_id": "r1"}
    assert same.load().epochs_done == 2

    new = {**old, "imgpipe/devices.py": "cccc", "keras": "3.12.0"}
    other = TrainingCheckpoint(tmp_path / "ckpt", "params", code=new)
    with caplog.at_level(logging.INFO, logger="imgpipe.checkpoints"):
        assert other.saved_extra() is None  # a new MLflow run, not the old one
        assert other.load() is None
    assert (
        f"checkpoint {tmp_path / 'ckpt'} was made by other code (imgpipe/devices.py changed, "
        "keras 3.11.0 -> 3.12.0): starting over"
    ) in caplog.text


@pytest.mark.parametrize("damage", ["state.json", "arrays", "format"])
def test_a_checkpoint_that_cannot_be_read_is_set_aside(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = TrainingCheckpoint(tmp_path / "ckpt", "params", code={"a.py": "1"})
    checkpoint.save(1, {"loss": [1.0]}, ARRAYS, seconds=1.0)
    state_path = tmp_path / "ckpt" / "state.json"
    if damage == "state.json":
        state_path.write_text("{not json")
    elif damage == "arrays":
        npz = tmp_path / "ckpt" / "state-00001.npz"
        npz.write_bytes(npz.read_bytes()[:40])  # cut short, as a full disk leaves it
    else:  # a checkpoint written before the code digest existed
        state = json.loads(state_path.read_text())
        state["format_version"] = 1
        state_path.write_text(json.dumps(state))

    with caplog.at_level(logging.INFO, logger="imgpipe.checkpoints"):
        assert checkpoint.load() is None
        assert checkpoint.load() is None  # and again: the rerun after does not fail either
    if damage == "format":
        assert "was made by other code (checkpoint format 1, this code writes 2)" in caplog.text
        return
    assert "cannot be restored" in caplog.text and "set aside" in caplog.text
    assert not (tmp_path / "ckpt").exists()
    assert (tmp_path / "ckpt.set-aside" / "state.json").is_file()
    checkpoint.save(1, {"loss": [1.0]}, ARRAYS, seconds=1.0)
    checkpoint.clear()
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ckpt.set-aside").exists()


@pytest.mark.slow
def test_a_checkpoint_keras_cannot_restore_is_set_aside_and_training_starts_over(
    params: Params, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Arrays of the right names and the wrong shapes (as after a change to the network):
    training starts over instead of failing on every rerun."""
    data = digits_split(128, 64)
    section = params.model_section("dense").model_copy(
        update={"hidden_units": [8], "epochs": 1, "batch_size": 32, "precision": "float32"}
    )
    checkpoint = TrainingCheckpoint(tmp_path / "ckpt", "params")
    fit("dense", section, **data, num_classes=10, seed=0, checkpoint=checkpoint)
    state = checkpoint.load()
    assert state is not None and state.epochs_done == 1
    wrong = {name: np.zeros((*array.shape, 2), array.dtype) for name, array in state.arrays.items()}
    checkpoint.save(1, state.history, wrong, seconds=state.seconds)

    again = section.model_copy(update={"epochs": 2})
    with caplog.at_level(logging.WARNING, logger="imgpipe.checkpoints"):
        result = fit("dense", again, **data, num_classes=10, seed=0, checkpoint=checkpoint)
    assert result.resumed_from_epoch == 0
    assert len(result.history["loss"]) == 2
    assert "cannot be restored (checkpoint array" in caplog.text
    assert (tmp_path / "ckpt.set-aside" / "state.json").is_file()
    assert checkpoint_epochs(tmp_path / "ckpt") == 2  # the new run's own checkpoint


@pytest.mark.slow
def test_a_resume_after_a_code_change_starts_over_and_says_why(tmp_path: Path) -> None:
    """The train stage in a copy of the project (cwd comes first on sys.path: the copy's code
    runs), killed after its first epoch; a module of the copy changes; the rerun starts over in
    a new MLflow run and says why."""
    copy_project(tmp_path)
    params = load_repo_params()
    params["views"] = {"gray8": {"height": 8, "width": 8, "color": "grayscale"}}
    params["models"] = {"dense": "gray8"}
    params["dense"].update(hidden_units=[64], epochs=8, batch_size=32)
    project = write_train_project(tmp_path, params)
    command = train_command("models/dense", "checkpoints/dense")
    checkpoint = project / "checkpoints" / "dense"
    process = start_stage(command, project, project / "killed.log")
    kill_when(process, lambda: checkpoint_epochs(checkpoint) >= 1, timeout=240)
    killed_run = json.loads((checkpoint / "state.json").read_text())["extra"]["run_id"]

    with (project / "imgpipe" / "devices.py").open("a") as handle:
        handle.write("# a change to the code that shapes the model\n")
    output = run_stage_subprocess(command, project, project / "rerun.log")

    assert (
        "checkpoint checkpoints/dense was made by other code (imgpipe/devices.py changed): "
        "starting over"
    ) in output
    assert "resuming from checkpoint" not in output
    summary = json.loads((project / "models" / "dense" / "history.json").read_text())
    assert summary["resumed_from_epoch"] == 0
    new_run = json.loads((project / "models" / "dense" / "mlflow_run.json").read_text())["run_id"]
    assert new_run != killed_run
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    assert {m.step for m in client.get_metric_history(new_run, "val_loss")} == set(range(8))
