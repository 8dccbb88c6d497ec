"""The team workflow for real: a DVC remote, queued experiments, an MLflow server, the MLflow UI
in headless Chromium and `mlflow models serve`, all started on 127.0.0.1 in temporary folders.

One module-scoped project: raw digits added with `dvc add`, `dvc repro` logging to a real
`mlflow server`, `dvc push` to a local-directory remote. The tests then clone it, pull, queue
experiments, serve the registered model and open the UI against that one server.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from PIL import Image

from benchmarks.serve import hostile_requests, judge, post, request_body
from tests.support import BIN, ROOT, command_env, free_port, run, stages_run
from tests.team_support import (
    MODELS,
    chromium_paths,
    make_project,
    mlflow_compare_view,
    refresh_screenshot,
    serving,
)

EXPERIMENT = "imgpipe"
VARIATIONS = (  # queued experiments: each retrains numpy_mlp only (no TensorFlow, seconds each)
    ["-S", "numpy_mlp.learning_rate=0.003"],
    ["-S", "numpy_mlp.learning_rate=0.03"],
    ["-S", "numpy_mlp.hidden_units=[16]"],
)
SCREENSHOT = ROOT / "docs" / "mlflow-compare.png"

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Team:
    """The shared project: its git repository, DVC remote, MLflow server and environment."""

    origin: Path
    remote: Path
    artifacts: Path
    tracking_uri: str
    env: dict[str, str]  # MLFLOW_TRACKING_URI points at the server
    repro_output: str = field(repr=False)  # long: kept out of failure reports
    raw_files: int


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`mlflow server` with a SQLite backend and a local artifact store, on a free port."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # no background job workers (GenAI scorers): a dozen idle processes on a 2-core machine
    env = {**command_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with serving(args, cwd=folder, env=env, ready_url=f"{url}/health", timeout=240):
        yield url, folder / "artifacts"


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory, mlflow_server: tuple[str, Path]) -> Team:
    """The project with `dvc add`ed raw data, one `dvc repro` logged to the server, pushed."""
    url, artifacts = mlflow_server
    origin = tmp_path_factory.mktemp("origin")
    remote = tmp_path_factory.mktemp("dvc-remote")
    raw_files = make_project(origin)
    env = command_env()
    run(["dvc", "remote", "add", "-d", "storage", str(remote)], origin, env)
    run(["git", "commit", "-q", "-am", "the DVC remote"], origin, env)
    env = {**env, "MLFLOW_TRACKING_URI": url}
    output = run(["dvc", "repro"], origin, env)
    (remote.parent / "origin-repro.log").write_text(output)  # for a reader of a failure
    run(["git", "add", "-A"], origin, env)
    run(["git", "commit", "-q", "-m", "dvc repro"], origin, env)
    run(["dvc", "push"], origin, env)
    return Team(origin, remote, artifacts, url, env, output, raw_files)


def run_id_of(repo: Path, model: str) -> str:
    """The MLflow run id that train@<model> wrote next to the model."""
    return json.loads((repo / "models" / model / "mlflow_run.json").read_text())["run_id"]


# --------------------------------------------------------------------------- 3. MLflow server


def test_repro_logs_runs_metrics_plots_and_models_to_the_server(team: Team) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=team.tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    params = yaml.safe_load((team.origin / "params.yaml").read_text())
    commit = run(["git", "rev-parse", "HEAD~1"], team.origin, team.env).strip()
    for model in MODELS:
        run_id = run_id_of(team.origin, model)
        found = client.get_run(run_id)
        assert found.info.status == "FINISHED"
        assert found.info.run_name == f"{model}-{commit[:7]}"
        assert found.data.tags["model"] == model
        assert found.data.params["view.height"] == "16"
        for key, value in params[model].items():  # the model's whole section
            assert found.data.params[f"{model}.{key}"] == str(value), key
        assert found.data.params["n_train"] == str(int(team.raw_files * 0.8))
        epochs = params[model].get("epochs", 1)  # logreg: one fit, one "epoch"
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert steps == list(range(epochs)), key
        metrics_file = json.loads((team.origin / "metrics" / f"{model}.json").read_text())
        for key in ("accuracy", "loss", "f1", "precision", "recall"):
            assert found.data.metrics[f"test_{key}"] == pytest.approx(metrics_file[key])
        plots = {a.path for a in client.list_artifacts(run_id, "plots")}
        for png in ("confusion.png", "history.png", "predictions.png"):
            assert f"plots/{png}" in plots
        assert {a.path for a in client.list_artifacts(run_id, "metrics")} == {
            f"metrics/{model}.json"
        }
        models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
        assert any(m.source_run_id == run_id for m in models), f"no logged model for {model}"
    # the artifacts went through the server into its artifact store on disk
    assert list(team.artifacts.rglob("confusion.png"))
    assert list(team.artifacts.rglob("MLmodel"))


# --------------------------------------------------------------------------- 1. DVC remote


def test_fresh_clone_pulls_data_tables_and_models_and_has_nothing_to_do(
    team: Team, tmp_path: Path
) -> None:
    env = command_env()  # no tracking server: a clone must not need one when nothing reruns
    assert "in sync" in run(["dvc", "status", "--cloud"], team.origin, env)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(team.origin), str(clone)], tmp_path, env)
    tracked = run(["git", "ls-files"], clone, env).split()
    assert "data/raw/digits.dvc" in tracked and "dvc.lock" in tracked
    assert not (clone / "data" / "raw" / "digits").exists()
    assert not (clone / "models" / "dense").exists()

    run(["dvc", "pull"], clone, env)

    pulled_raw = sorted((clone / "data" / "raw" / "digits").rglob("*.png"))
    assert len(pulled_raw) == team.raw_files
    for relative in (
        "data/tables/gray16/train.parquet",
        "data/tables/gray16/test.parquet",
        "data/split-report.json",
        "models/dense/model.keras",
        "models/numpy_mlp/model.npz",
        "plots/dense/confusion.png",
    ):
        assert (clone / relative).read_bytes() == (team.origin / relative).read_bytes(), relative
    assert "up to date" in run(["dvc", "status"], clone, env)
    assert stages_run(run(["dvc", "repro"], clone, env)) == set()
    # the pulled results are enough for the plots page too
    run(["dvc", "plots", "show", "-o", str(tmp_path / "dvc_plots")], clone, env)
    page = (tmp_path / "dvc_plots" / "index.html").read_text()
    assert "Loss per epoch" in page and "predictions.png" in page


# --------------------------------------------------------------------------- 5. registry, serving


def png_base64(pixels) -> str:
    """A (H, W) uint8 array as base64 PNG text, as a JSON request carries it."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.mark.parametrize(
    ("model", "server"),  # a Keras and a scikit-learn model; the project's server and MLflow's
    [("dense", "imgpipe-serve"), ("logreg", "mlflow models serve")],
)
def test_registered_model_is_served_over_http(
    team: Team, tmp_path: Path, model: str, server: str
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=team.tracking_uri)
    name = f"{EXPERIMENT}-{model}"
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert version.run_id == run_id_of(team.origin, model)
    test_metrics = json.loads((team.origin / "metrics" / f"{model}.json").read_text())
    assert float(version.tags["test_accuracy"]) == pytest.approx(test_metrics["accuracy"])
    assert version.tags["n_test"] == str(test_metrics["n_test"])

    port = free_port()
    uri = f"models:/{name}/{version.version}"
    address = ["--host", "127.0.0.1", "--port", str(port)]
    if server == "imgpipe-serve":
        args = [str(BIN / "imgpipe-serve"), uri, *address]
    else:
        args = [str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local"]
        args += [*address, "--workers", "1"]
    env = {k: v for k, v in team.env.items() if k != "PYTHONPATH"}
    from imgpipe.demo import digits_images

    pixels, labels = digits_images()
    images = [png_base64(pixels[i]) for i in range(4)]
    request = {
        "dataframe_split": {
            "columns": ["image"],
            "data": [[image] for image in images] + [["bm90IGFuIGltYWdl"]],  # "not an image"
        }
    }
    url = f"http://127.0.0.1:{port}"
    with serving(args, cwd=tmp_path, env=env, ready_url=f"{url}/ping", timeout=240):
        answer = urllib.request.urlopen(
            urllib.request.Request(
                f"{url}/invocations",
                data=json.dumps(request).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=60,
        )
        predictions = json.loads(answer.read())["predictions"]
        if server == "imgpipe-serve":
            # hostile requests (benchmarks/serve.py's list): per-row errors or a one-line 4xx, never
            # a stack trace, and the server goes on answering
            with closing(http.client.HTTPConnection("127.0.0.1", port, timeout=300)) as connection:
                valid = base64.b64decode(images[0])
                for hostile in hostile_requests(valid):
                    status, body = post(connection, hostile.body, hostile.content_type)
                    assert judge(hostile, status, body) is None, (hostile.name, status, body[:500])
                status, body = post(connection, request_body([valid]))
                assert status == 200 and json.loads(body)["predictions"][0]["label"] is not None
    assert len(predictions) == len(images) + 1
    for row in predictions[:-1]:
        assert row["label"] in {str(d) for d in range(10)}
        assert 0.0 < row["probability"] <= 1.0
        assert row["error"] is None
    assert predictions[-1]["label"] is None and predictions[-1]["error"]
    answers = [row["label"] for row in predictions[:-1]]
    correct = sum(answer == str(label) for answer, label in zip(answers, labels[:4], strict=True))
    assert correct >= 1, (answers, labels[:4])  # a trained model, not random weights


# --------------------------------------------------------------------------- 2. experiments


@pytest.fixture(scope="module")
def experiments(team: Team) -> dict[str, dict]:
    """Three queued variations, run from the queue: {experiment name: its `dvc exp show` row}."""
    for variation in VARIATIONS:
        run(["dvc", "exp", "run", "--queue", *variation], team.origin, team.env)
    output = run(["dvc", "exp", "run", "--run-all"], team.origin, team.env, timeout=900)
    (team.remote.parent / "origin-exp-run.log").write_text(output)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], team.origin, team.env))
    rows = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for revision in experiment["revs"]:
                rows[revision["name"]] = revision
    return rows


def params_of(row: dict) -> dict:
    """params.yaml as `dvc exp show --json` reports it for one experiment."""
    return row["data"]["params"]["params.yaml"]["data"]


def test_queued_experiments_show_params_metrics_and_mlflow_runs(
    team: Team, experiments: dict[str, dict]
) -> None:
    from mlflow.tracking import MlflowClient

    assert len(experiments) == len(VARIATIONS)
    variations = [params_of(row)["numpy_mlp"] for row in experiments.values()]
    learning_rates = sorted(v["learning_rate"] for v in variations)
    assert learning_rates == [0.003, 0.01, 0.03]
    assert [16] in [v["hidden_units"] for v in variations]
    client = MlflowClient(tracking_uri=team.tracking_uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    for name, row in experiments.items():
        assert row.get("error") is None, row
        shown_metrics = row["data"]["metrics"]["metrics/numpy_mlp.json"]["data"]
        assert 0.0 <= shown_metrics["accuracy"] <= 1.0
        (mlflow_run,) = client.search_runs(
            [experiment_id], filter_string=f"tags.dvc_experiment = '{name}'"
        )
        assert mlflow_run.info.run_name == f"numpy_mlp-{name}"  # only numpy_mlp reran
        assert mlflow_run.data.metrics["test_accuracy"] == pytest.approx(shown_metrics["accuracy"])
        variation = params_of(row)["numpy_mlp"]
        assert mlflow_run.data.params["numpy_mlp.learning_rate"] == str(variation["learning_rate"])
    versions = client.search_model_versions(f"name = '{EXPERIMENT}-numpy_mlp'")
    assert len(versions) == 1 + len(VARIATIONS)  # the baseline and one per experiment
    # every queued run reran train@numpy_mlp and evaluate@numpy_mlp and nothing else
    log = (team.remote.parent / "origin-exp-run.log").read_text()
    assert stages_run(log) == {"train@numpy_mlp", "evaluate@numpy_mlp"}


def test_exp_apply_and_exp_branch(team: Team, experiments: dict[str, dict]) -> None:
    name, row = next(
        (n, r) for n, r in experiments.items() if params_of(r)["numpy_mlp"]["hidden_units"] == [16]
    )
    run(["dvc", "exp", "branch", name, "hidden16"], team.origin, team.env)
    on_branch = yaml.safe_load(run(["git", "show", "hidden16:params.yaml"], team.origin, team.env))
    assert on_branch["numpy_mlp"]["hidden_units"] == [16]

    run(["dvc", "exp", "apply", name], team.origin, team.env)
    applied = yaml.safe_load((team.origin / "params.yaml").read_text())
    assert applied["numpy_mlp"]["hidden_units"] == [16]
    metrics = json.loads((team.origin / "metrics" / "numpy_mlp.json").read_text())
    shown = row["data"]["metrics"]["metrics/numpy_mlp.json"]["data"]
    assert metrics["accuracy"] == pytest.approx(shown["accuracy"])
    assert "up to date" in run(["dvc", "status"], team.origin, team.env)
    run(["git", "checkout", "-q", "--", "."], team.origin, team.env)  # back to the baseline
    run(["dvc", "checkout", "--force"], team.origin, team.env)


# --------------------------------------------------------------------------- 4. MLflow UI


def test_mlflow_ui_compares_runs_in_headless_chromium(team: Team, tmp_path: Path) -> None:
    chromium_paths()  # skipped (or failed under CI) before any work when there is no browser
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=team.tracking_uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([experiment_id], filter_string="tags.model = 'numpy_mlp'")
    assert len(runs) >= 2
    run_ids = json.dumps([r.info.run_id for r in runs], separators=(",", ":"))
    query = urllib.parse.urlencode(
        {"runs": run_ids, "experiments": json.dumps([experiment_id])}, quote_via=urllib.parse.quote
    )
    page = f"{team.tracking_uri}/#/compare-runs?{query}"
    run_names = [r.info.run_name for r in runs]
    metric_names = ["accuracy", "loss", "test_accuracy"]  # the first rows: the table is virtual

    shot = tmp_path / "mlflow-compare.png"
    texts = [*run_names, "numpy_mlp.learning_rate", *metric_names]
    missing = mlflow_compare_view(page, texts, shot, "1400,1200")
    assert not missing, f"not visible on {page}: {missing} (see {shot})"
    refresh_screenshot(shot, SCREENSHOT)  # docs/mlflow-compare.png
