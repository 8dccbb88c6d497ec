"""End to end: `dvc repro` in a temporary copy of the project, then MLflow, reruns and predict."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.support import BIN, command_env, copy_project, run, small_params, stages_run

MODELS = ("dense", "cnn", "numpy_mlp", "logreg")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A fresh git + DVC copy of the project with small params, after one `dvc repro`."""
    repo = tmp_path_factory.mktemp("project")
    copy_project(repo)
    # the whole pipeline trains in seconds on the demo digits
    models = {"dense": "gray16", "cnn": "rgb16", "numpy_mlp": "gray16", "logreg": "gray16"}
    params = small_params(repo / "params.yaml", models, epochs=4)
    params["cnn"].update(filters=[8, 16], epochs=2, head_units=16)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = command_env()
    run(["git", "init", "-q", "-b", "main"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "project copy"], repo, env)
    output = run(["dvc", "repro"], repo, env)
    (repo / "first_repro.log").write_text(output)
    return repo, env


def test_first_repro_runs_every_stage(project: tuple[Path, dict[str, str]]) -> None:
    repo, _ = project
    ran = stages_run((repo / "first_repro.log").read_text())
    expected = {"demo", "split", "tabulate", "weights"} | {
        f"{s}@{m}" for s in ("train", "evaluate") for m in MODELS
    }
    assert ran == expected


def test_metrics_for_every_model(project: tuple[Path, dict[str, str]]) -> None:
    repo, env = project
    for model in MODELS:
        metrics = json.loads((repo / "metrics" / f"{model}.json").read_text())
        assert 0.0 <= metrics["accuracy"] <= 1.0
        if model != "cnn":  # two epochs of a 16x16 CNN need not beat chance; the others must
            assert metrics["accuracy"] > 0.5, f"{model} barely learned the digits: {metrics}"
        assert metrics["dataset"] == "demo"
        assert {"precision", "recall", "f1", "loss"} <= metrics.keys()
        assert "roc_auc" not in metrics  # ten classes
        for plot in ("confusion.csv", "confusion.png", "history.png", "predictions.png"):
            assert (repo / "plots" / model / plot).stat().st_size > 0
    shown = run(["dvc", "metrics", "show", "--json"], repo, env)
    assert all(f"metrics/{m}.json" in shown for m in MODELS)


def test_split_report_adds_up(project: tuple[Path, dict[str, str]]) -> None:
    repo, _ = project
    report = json.loads((repo / "data" / "split-report.json").read_text())
    assert sum(report["totals"].values()) == report["selected"] == report["readable"]
    for split_name, per_class in report["counts"].items():
        files = list((repo / "data" / "split" / split_name).rglob("*.png"))
        assert len(files) == sum(per_class.values())


def test_second_repro_does_nothing(project: tuple[Path, dict[str, str]]) -> None:
    repo, env = project
    output = run(["dvc", "repro"], repo, env)
    assert stages_run(output) == set()
    assert "up to date" in run(["dvc", "status"], repo, env)


def test_changing_one_model_param_reruns_only_that_model(
    project: tuple[Path, dict[str, str]],
) -> None:
    repo, env = project
    params_path = repo / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["dense"]["epochs"] = 2
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    output = run(["dvc", "repro"], repo, env)
    assert stages_run(output) == {"train@dense", "evaluate@dense"}


def test_mlflow_runs_hold_params_history_metrics_plots_and_model(
    project: tuple[Path, dict[str, str]],
) -> None:
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    repo, _ = project
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("imgpipe")
    assert experiment is not None
    params_text = (repo / "params.yaml").read_text()
    for model in MODELS:
        run_id = json.loads((repo / "models" / model / "mlflow_run.json").read_text())["run_id"]
        run_data = client.get_run(run_id)
        assert run_data.info.status == "FINISHED"
        assert run_data.data.tags["model"] == model
        assert run_data.data.tags["dataset"] == "demo"
        assert len(run_data.data.tags["data_hash"]) == 16
        assert run_data.data.params["split.seed"] == "42"
        assert run_data.data.params["view.height"] == "16"
        assert "test_accuracy" in run_data.data.metrics
        trained = json.loads((repo / "models" / model / "history.json").read_text())
        epochs = len(trained["history"]["val_loss"])  # logreg: one fit, one "epoch"
        assert epochs == (1 if model == "logreg" else yaml.safe_load(params_text)[model]["epochs"])
        history = client.get_metric_history(run_id, "val_loss")
        assert [m.step for m in history] == list(range(epochs))
        artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
        assert "plots/confusion.png" in artifacts
        mlflow.set_tracking_uri(uri)
        loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
        channels = 1 if model != "cnn" else 3
        batch = np.random.default_rng(0).integers(0, 256, (4, 16, 16, channels), dtype=np.uint8)
        # the signature is the clients' base64 `image` column: pixels go to the wrapper itself
        predictions = loaded.unwrap_python_model().predict(None, batch)
        assert len(predictions) == 4
        assert set(predictions["label"]) <= {str(d) for d in range(10)}
        assert np.allclose(predictions.filter(like="p_").sum(axis=1), 1.0, atol=1e-4)


def test_predict_command_classifies_files_and_reports_bad_ones(
    project: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    repo, env = project
    images = tmp_path / "images"
    images.mkdir()
    digit_dir = repo / "data" / "split" / "test" / "3"
    for source in sorted(digit_dir.iterdir())[:3]:
        shutil.copy(source, images / source.name)
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(images / "odd-mode.png")
    (images / "broken.jpg").write_bytes(b"not an image at all")
    out_csv = tmp_path / "predictions.csv"
    result = subprocess.run(
        [str(BIN / "imgpipe-predict"), "models/dense", str(images), "--out", str(out_csv)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4  # three digits and the RGBA image; the broken file is reported
    assert "broken.jpg: skipped" in result.stderr
    rows = out_csv.read_text().strip().splitlines()
    assert rows[0] == "path,label,probability"
    assert len(rows) == 5
    for line in lines:
        path, label, probability = line.rsplit(",", 2)
        assert Path(path).exists()
        assert label in {str(d) for d in range(10)}
        assert 0.0 < float(probability) <= 1.0


def test_killed_dvc_repro_resumes_training_on_the_next_repro(
    project: tuple[Path, dict[str, str]],
) -> None:
    """SIGKILL `dvc repro` mid-way through train@dense: no model is left behind, and the next
    `dvc repro` resumes from the checkpoint and completes the stage and its evaluation."""
    import signal
    import time

    repo, env = project
    params_path = repo / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["dense"].update(epochs=12, hidden_units=[256, 128])
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    state_path = repo / "checkpoints" / "dense" / "state.json"
    log_path = repo / "killed_repro.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            ["dvc", "repro", "train@dense"],
            cwd=repo,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 300
    while True:
        try:
            if json.loads(state_path.read_text())["epochs_done"] >= 2:
                break
        except (OSError, ValueError):
            pass
        assert process.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "train@dense made no progress"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert not (repo / "models" / "dense" / "model.keras").exists()

    output = run(["dvc", "repro"], repo, env)
    assert stages_run(output) == {"train@dense", "evaluate@dense"}
    assert "resuming from checkpoint checkpoints/dense" in output
    assert not (repo / "checkpoints" / "dense").exists()
    history = json.loads((repo / "models" / "dense" / "history.json").read_text())
    assert history["resumed_from_epoch"] >= 2
    assert len(history["history"]["val_loss"]) == 12
    assert json.loads((repo / "metrics" / "dense.json").read_text())["accuracy"] > 0.5
    assert "up to date" in run(["dvc", "status"], repo, env)
