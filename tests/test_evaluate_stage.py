"""The evaluate stage on the demo data (scikit-learn's digits) with a real SQLite MLflow store:
metrics with their intervals, per-image answers, the model card, what the run and the registered
version hold, and what `dvc metrics show` shows."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from imgpipe.cards import DESCRIPTION_LIMIT
from imgpipe.tables import read_table
from tests.support import (
    BIN,
    command_env,
    load_repo_params,
    run,
    run_stage_in_process,
    train_here,
    write_digit_tables,
)

pytestmark = pytest.mark.slow
MODEL = "logreg"
OLD_KEYS = {"accuracy", "loss", "precision", "recall", "f1", "n_test", "train_seconds"}
OLD_KEYS |= {"train_images_per_second", "parameters", "dataset"}
HEADLINE = ("accuracy", "loss", "precision", "recall", "f1")  # ten classes: no ROC AUC


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder where train@logreg and then evaluate@logreg ran on the digit tables (8x8 gray),
    logging into folder/mlflow.db."""
    import mlflow

    folder = tmp_path_factory.mktemp("evaluate")
    write_digit_tables(folder / "tables" / "gray8")
    params = load_repo_params()
    params["views"] = {"gray8": {"height": 8, "width": 8, "color": "grayscale"}}
    params["models"] = {MODEL: "gray8"}
    params["tracking"]["uri"] = f"sqlite:///{folder / 'mlflow.db'}"
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("DVC_EXP_NAME", raising=False)
        try:
            train_here(MODEL)
            run_stage_in_process(
                "evaluate",
                *("--model", MODEL, "--tables", "tables/gray8", "--model-dir", f"models/{MODEL}"),
                *("--metrics", f"metrics/{MODEL}.json", "--plots", f"plots/{MODEL}"),
                *("--answers", f"answers/{MODEL}.csv", "--card", f"cards/{MODEL}.md"),
            )
        finally:
            mlflow.set_tracking_uri(None)
    yield folder


def _metrics(project: Path) -> dict:
    return json.loads((project / "metrics" / f"{MODEL}.json").read_text())


def _answers(project: Path) -> list[dict[str, str]]:
    text = (project / "answers" / f"{MODEL}.csv").read_text()
    return list(csv.DictReader(io.StringIO(text)))


def _table_rows(card: str, heading: str) -> dict[str, list[str]]:
    """The rows of the table under `## heading`, by their first cell (header left out)."""
    section = card.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("|")]
    return {row[0].strip(): [c.strip() for c in row[1:]] for row in rows[2:]}


def _client(project: Path):  # -> MlflowClient
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def _run_id(project: Path) -> str:
    return json.loads((project / "models" / MODEL / "mlflow_run.json").read_text())["run_id"]


def test_metrics_keep_their_keys_and_add_intervals(project: Path) -> None:
    metrics = _metrics(project)
    assert metrics.keys() >= OLD_KEYS
    for key in HEADLINE:
        low, high = metrics[f"{key}_ci95"]
        assert low < metrics[key] < high
        assert [metrics[f"{key}_ci95_low"], metrics[f"{key}_ci95_high"]] == [low, high]
    per_class = metrics["per_class"]
    assert list(per_class) == [str(d) for d in range(10)]
    assert sum(row["support"] for row in per_class.values()) == metrics["n_test"]
    macro_f1 = sum(row["f1"] for row in per_class.values()) / 10
    assert macro_f1 == pytest.approx(metrics["f1"])


def test_answers_hold_one_row_per_test_image_and_the_metrics_accuracy(project: Path) -> None:
    answers = _answers(project)
    table = read_table(project / "tables" / "gray8" / "test.parquet")
    assert [row["source"] for row in answers] == [f"test/{s}" for s in table.sources]
    assert list(answers[0]) == ["source", "label", "predicted", "probability", "correct"]
    for row, label in zip(answers, table.labels, strict=True):
        assert row["label"] == table.class_names[label]
        assert row["correct"] == str(int(row["label"] == row["predicted"]))
        assert 0.1 <= float(row["probability"]) <= 1.0  # the largest of ten probabilities
    accuracy = sum(int(row["correct"]) for row in answers) / len(answers)
    assert accuracy == pytest.approx(_metrics(project)["accuracy"], abs=1e-12)


def test_card_figures_equal_the_metrics_file(project: Path) -> None:
    card = (project / "cards" / f"{MODEL}.md").read_text()
    metrics = _metrics(project)
    results = _table_rows(card, "Test results")
    labels = {"accuracy": "accuracy", "loss": "loss (cross-entropy)", "f1": "F1"}
    for key in HEADLINE:
        low, high = metrics[f"{key}_ci95"]
        assert results[labels.get(key, key)] == [
            f"{metrics[key]:.4f}",
            f"{low:.4f} – {high:.4f}",
        ]
    per_class = _table_rows(card, "Per class")
    confusion = _table_rows(card, "Confusion matrix")
    for name, row in metrics["per_class"].items():
        low, high = row["recall_ci95"]
        assert per_class[name][0] == str(row["support"])
        assert per_class[name][2] == f"{row['recall']:.4f} [{low:.4f}, {high:.4f}]"
        counts = [int(c) for c in confusion[f"**{name}**"]]
        assert sum(counts) == row["support"]
        assert counts[int(name)] == round(row["recall"] * row["support"])  # the diagonal
    data = _table_rows(card, "Data")
    assert data["**total**"] == ["1,200", "300", f"{metrics['n_test']:,}"]


def test_card_names_the_data_hash_of_the_training_run_and_the_machine(project: Path) -> None:
    card = (project / "cards" / f"{MODEL}.md").read_text()
    tags = _client(project).get_run(_run_id(project)).data.tags
    assert f"train and val tables `{tags['data_hash']}`" in card
    history = json.loads((project / "models" / MODEL / "history.json").read_text())
    assert f"- Machine: {history['machine']['cpu']}, {history['machine']['cores']} cores" in card
    assert "Only these 10 classes" in card


def test_run_holds_the_intervals_answers_and_card(project: Path, tmp_path: Path) -> None:
    import mlflow

    client = _client(project)
    run_id = _run_id(project)
    logged = client.get_run(run_id).data.metrics
    metrics = _metrics(project)
    for key in HEADLINE:
        assert logged[f"test_{key}"] == pytest.approx(metrics[key])
        assert logged[f"test_{key}_ci95_low"] == pytest.approx(metrics[f"{key}_ci95"][0])
        assert logged[f"test_{key}_ci95_high"] == pytest.approx(metrics[f"{key}_ci95"][1])
    assert logged["test_class_3_recall"] == pytest.approx(metrics["per_class"]["3"]["recall"])
    for artifact, local in (("answers.csv", "answers/logreg.csv"), ("card.md", "cards/logreg.md")):
        fetched = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=f"evaluation/{artifact}",
            dst_path=str(tmp_path),
            tracking_uri=f"sqlite:///{project / 'mlflow.db'}",
        )
        assert Path(fetched).read_bytes() == (project / local).read_bytes()


def test_registered_version_is_described_by_the_card_summary(project: Path) -> None:
    card = (project / "cards" / f"{MODEL}.md").read_text()
    summary = card.split("\n\n")[1]
    (version,) = _client(project).search_model_versions(f"name = 'imgpipe-{MODEL}'")
    assert version.run_id == _run_id(project)
    assert version.description == summary
    assert len(summary) <= DESCRIPTION_LIMIT
    assert f"accuracy {_metrics(project)['accuracy']:.4f} [" in summary
    assert float(version.tags["test_accuracy_ci95_low"]) == _metrics(project)["accuracy_ci95"][0]


def test_dvc_metrics_show_shows_the_intervals(project: Path) -> None:
    env = command_env()
    if not (project / ".dvc").exists():
        run([str(BIN / "dvc"), "init", "--no-scm", "-q"], project, env)
    shown = json.loads(
        run([str(BIN / "dvc"), "metrics", "show", "--json", f"metrics/{MODEL}.json"], project, env)
    )
    figures = shown[""]["data"][f"metrics/{MODEL}.json"]["data"]
    metrics = _metrics(project)
    assert figures["accuracy"] == metrics["accuracy"]  # today's keys, as they were
    for key in HEADLINE:  # DVC leaves lists out: the bounds show as scalars
        assert figures[f"{key}_ci95_low"] == metrics[f"{key}_ci95"][0]
        assert figures[f"{key}_ci95_high"] == metrics[f"{key}_ci95"][1]
    assert figures["per_class"]["7"]["f1"] == metrics["per_class"]["7"]["f1"]
