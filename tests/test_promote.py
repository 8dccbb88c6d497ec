"""imgpipe-promote on a real SQLite store: McNemar's exact test and the Wilson intervals; two
logistic regressions of different quality trained by the train stage's core on the same digit
tables, their per-image test answers from real predictions; promotion of the better one,
refusal of the worse one and of one tested on other images, --force, rollback; and what every
training run records: its user, its tables as MLflow datasets, its system metrics."""

from __future__ import annotations

import contextlib
import getpass
import io
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from imgpipe.promote import compare_answers, main, mcnemar_exact
from tests.support import command_env, load_repo_params, train_here, write_train_project
from tests.team_support import TeamServer, team_server

MODEL = "logreg"
PRODUCTION = f"imgpipe-{MODEL}-production"


# --------------------------------------------------------------------------- the statistics


@pytest.mark.parametrize(("b", "c"), [(0, 0), (1, 0), (5, 5), (12, 3), (3, 12), (40, 61)])
def test_mcnemar_exact_is_the_two_sided_binomial_test_on_the_discordant_pairs(
    b: int, c: int
) -> None:
    from scipy.stats import binomtest

    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def answers(correct: str, prefix: str = "test/") -> list[dict[str, str]]:
    """Answers rows for images 0..n-1 whose `correct` column is the string given ("1101")."""
    return [
        {"source": f"{prefix}{i}.png", "label": "a", "predicted": "a", "correct": flag}
        for i, flag in enumerate(correct)
    ]


def test_compare_answers_counts_the_discordant_pairs_image_by_image() -> None:
    found = compare_answers(answers("1111100"), answers("1100011"), alpha=0.05)
    assert (found.n, found.candidate_right, found.champion_right) == (7, 5, 4)
    assert (found.candidate_only, found.champion_only) == (3, 2)
    assert found.p_value == 1.0 and not found.better
    line = found.line("4")
    assert "candidate accuracy 0.7143 [0.3589, 0.9178]" in line  # Wilson, 5 of 7
    assert (
        "champion (version 4) 0.5714" in line
        and "p = 1, alpha 0.05: no significant difference" in line
    )


def test_compare_answers_refuses_other_test_images_and_says_which() -> None:
    with pytest.raises(Exception, match=r"tested on different images \(3 and 3; 1 only the "):
        compare_answers(answers("111"), answers("11", "test/") + answers("1", "other/"), 0.05)


# --------------------------------------------------------------------------- a real store


@dataclass(frozen=True)
class Store:
    """A project folder whose mlflow.db holds four logreg runs with their test answers."""

    folder: Path
    uri: str
    weak: str  # run ids: max_iter 1
    good: str  # max_iter 300
    weak_again: str  # max_iter 1 again: a second, equally weak candidate
    other_images: str  # max_iter 300, answers on the val table's images


def log_answers(folder: Path, run_id: str, table: str, uri: str | None = None) -> None:
    """The model now in folder/models/logreg answering every image of a table, logged to its run
    as evaluate does (`evaluation/answers.csv`)."""
    from mlflow.tracking import MlflowClient

    from imgpipe.classifier import Classifier
    from imgpipe.evaluation import rows_csv
    from imgpipe.metrics import answer_rows
    from imgpipe.tables import read_table

    pixels = read_table(folder / "tables" / "gray8" / f"{table}.parquet")
    proba = Classifier.load(folder / "models" / MODEL).predict_proba(pixels.pixels)
    rows = answer_rows(pixels.sources, pixels.labels, proba, pixels.class_names)
    path = folder / "answers" / run_id / "answers.csv"
    path.parent.mkdir(parents=True)
    path.write_bytes(rows_csv(rows))
    uri = uri or f"sqlite:///{folder / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).log_artifact(run_id, str(path), "evaluation")


def train_logreg(folder: Path, max_iter: int) -> str:
    """Train logreg with this max_iter in folder (the train stage's core); its run id."""
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params[MODEL]["max_iter"] = max_iter
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    train_here(MODEL)
    return json.loads((folder / "models" / MODEL / "mlflow_run.json").read_text())["run_id"]


def digits_project(folder: Path) -> Path:
    """A train project in `folder`: the repository's params, MODEL on 8x8 grayscale digits."""
    params = load_repo_params()
    params["views"] = {"gray8": {"height": 8, "width": 8, "color": "grayscale"}}
    params["models"] = {MODEL: "gray8"}
    return write_train_project(folder, params)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """Four trained runs in one SQLite store (system metrics sampled every 0.2 s)."""
    folder = digits_project(tmp_path_factory.mktemp("promote"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
        runs = {}
        for name, max_iter, table in [
            ("weak", 1, "test"),
            ("good", 300, "test"),
            ("weak_again", 1, "test"),
            ("other_images", 300, "val"),
        ]:
            runs[name] = train_logreg(folder, max_iter)
            log_answers(folder, runs[name], table)
        yield Store(folder, f"sqlite:///{folder / 'mlflow.db'}", **runs)


def promote(store: Store, *args: str) -> tuple[int, str]:
    """`imgpipe-promote logreg ARGS` in the project, in this process: (exit status, output)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(store.folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            main([MODEL, *args])
    code = exited.value.code
    if isinstance(code, str):  # a StageError: `[imgpipe-promote] message`, status 1
        return 1, out.getvalue() + code
    return code, out.getvalue()


def aliases(store: Store) -> dict[str, str]:
    """{alias: version} of the production model."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri=store.uri).get_registered_model(PRODUCTION)
    return {alias: str(version) for alias, version in found.aliases.items()}


@pytest.mark.slow
def test_promotion_gate_force_and_rollback_on_a_sqlite_store(store: Store) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.uri)
    # the console script, in its own process: no champion yet, so the first one just takes it
    result = subprocess.run(
        ["imgpipe-promote", MODEL, "--run", store.weak],
        cwd=store.folder, env=command_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"promoted run {store.weak} to {PRODUCTION} version 1" in result.stdout
    assert "first champion" in result.stdout
    assert aliases(store) == {"champion": "1"}
    first = client.get_model_version(PRODUCTION, "1")
    assert first.run_id == store.weak
    assert first.tags["imgpipe.promoted_by"] == getpass.getuser()
    assert first.tags["imgpipe.decision"] == "first champion"

    # the better model replaces it, the weak one stays as `previous`
    code, output = promote(store, "--run", store.good)
    assert code == 0, output
    assert "(better; on 297 test images: candidate accuracy" in output
    assert aliases(store) == {"champion": "2", "previous": "1"}
    second = client.get_model_version(PRODUCTION, "2")
    comparison = second.tags["imgpipe.comparison"]
    assert "champion (version 1)" in comparison and "the candidate is better" in comparison
    p_value = float(comparison.split("p = ")[1].split(",")[0])
    assert p_value < 0.05
    assert second.tags["imgpipe.source_run"] == store.good

    # an equally weak one is refused: counts, p-value, both accuracies with intervals
    code, output = promote(store, "--run", store.weak_again)
    assert code == 1
    assert output.startswith(f"refused: the candidate (run {store.weak_again}) is not better")
    assert "right only by the candidate" in output and "(95 % Wilson intervals)" in output
    assert aliases(store) == {"champion": "2", "previous": "1"}

    # one tested on other images cannot be compared (and with no candidate named, the
    # workspace's run is the candidate: models/logreg/mlflow_run.json, the last one trained)
    code, output = promote(store)
    assert code == 1
    assert "tested on different images (300 and 297" in output
    assert aliases(store) == {"champion": "2", "previous": "1"}

    # --force needs a reason, and records it
    code, output = promote(store, "--run", store.weak_again, "--force")
    assert code == 1 and "--force needs --reason" in output
    code, output = promote(store, "--run", store.weak_again, "--force", "--reason", "demo")
    assert code == 0, output
    assert aliases(store) == {"champion": "3", "previous": "2"}
    forced = client.get_model_version(PRODUCTION, "3").tags
    assert forced["imgpipe.decision"] == "forced (not better)"
    assert forced["imgpipe.promoted_reason"] == "demo"
    assert forced["imgpipe.comparison"].endswith("alpha 0.05: the champion is better")

    # rollback: one command, and a second one undoes it
    code, output = promote(store, "--rollback", "--reason", "forced one was worse")
    assert code == 0, output
    assert aliases(store) == {"champion": "2", "previous": "3"}
    restored = client.get_model_version(PRODUCTION, "2").tags
    assert restored["imgpipe.rolled_back_reason"] == "forced one was worse"
    assert restored["imgpipe.rolled_back_by"] == getpass.getuser()

    # what `models:/imgpipe-logreg-production@champion` serves
    assert client.get_model_version_by_alias(PRODUCTION, "champion").run_id == store.good


@pytest.mark.slow
def test_training_runs_record_user_datasets_and_system_metrics(store: Store) -> None:
    from mlflow.tracking import MlflowClient

    from imgpipe.tracking.runs import files_digest

    run = MlflowClient(tracking_uri=store.uri).get_run(store.good)
    assert run.data.tags["mlflow.user"] == getpass.getuser() == run.info.user_id
    inputs = {
        entry.dataset.name: (entry.dataset.digest, [t.value for t in entry.tags])
        for entry in run.inputs.dataset_inputs
    }
    tables = store.folder / "tables" / "gray8"
    assert inputs == {
        "gray8/train": (files_digest([tables / "train.parquet"]), ["training"]),
        "gray8/val": (files_digest([tables / "val.parquet"]), ["validation"]),
    }
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics


def test_the_run_user_is_the_login_name_on_a_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imgpipe.tracking.runs import Store as RunStore

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "carol")
    store = RunStore(f"sqlite:///{tmp_path / 'mlflow.db'}", "imgpipe")
    run = store.start_run(model_name=MODEL, dataset="digits", data_hash="0", params={})
    found = store.client.get_run(run.run_id)
    assert found.data.tags["mlflow.user"] == "carol" == found.info.user_id


# --------------------------------------------------------------------------- the team server

MAINTAINER, MEMBER, READER = "bob", "alice", "carol"


@dataclass(frozen=True)
class Team:
    """A running team server with two runs that the member logged, and everyone's logins."""

    server: TeamServer
    folder: Path  # the member's project
    weak: str
    good: str
    env: dict[str, dict[str, str]]  # {user: MLFLOW_* variables}


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    """scripts/team-server (PostgreSQL, HTTPS, logins) with a maintainer, a member and a third
    user; the member trains a weak and a good logreg into it, with their test answers."""
    from mlflow.server import get_app_client

    with team_server() as server:
        common = {
            "MLFLOW_TRACKING_URI": server.url,
            "MLFLOW_TRACKING_SERVER_CERT_PATH": str(server.cert),
        }
        env = {"admin": {**common, "MLFLOW_TRACKING_USERNAME": "admin",
                         "MLFLOW_TRACKING_PASSWORD": server.secrets["admin_password"]}}  # fmt: skip
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env["admin"].items():
                patch.setenv(key, value)
            auth = get_app_client("basic-auth", tracking_uri=server.url)
            for user in (MAINTAINER, MEMBER, READER):
                password = f"{user}-" + os.urandom(9).hex()
                auth.create_user(user, password)
                env[user] = {**common, "MLFLOW_TRACKING_USERNAME": user,
                             "MLFLOW_TRACKING_PASSWORD": password}  # fmt: skip
        folder = digits_project(tmp_path_factory.mktemp("team"))
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(folder)
            runs = {}
            for name, max_iter in (("weak", 1), ("good", 300)):
                for key, value in env[MEMBER].items():  # again: training clears the URI it set
                    patch.setenv(key, value)
                runs[name] = train_logreg(folder, max_iter)
                log_answers(folder, runs[name], "test", server.url)
        yield Team(server, folder, env=env, **runs)


def promote_as(team: Team, user: str, *args: str) -> subprocess.CompletedProcess:
    """`imgpipe-promote logreg ARGS` in the member's project with a user's login."""
    return subprocess.run(
        ["imgpipe-promote", MODEL, *args],
        cwd=team.folder, env={**command_env(), **team.env[user]},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_on_the_team_server_only_maintainers_promote(team: Team) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    # nobody promotes before the admin has made the production model
    refused = promote_as(team, MAINTAINER, "--run", team.weak)
    assert refused.returncode == 1
    # (the server answers 403 for a model that does not exist too: names cannot be probed)
    assert f"does not let user '{MAINTAINER}' use {PRODUCTION}" in refused.stderr
    assert "--setup-production --maintainer NAME` (run with the admin's login" in refused.stderr

    setup = promote_as(team, "admin", "--setup-production", "--maintainer", MAINTAINER,
                       "--member", MEMBER)  # fmt: skip
    assert setup.returncode == 0, setup.stderr
    assert setup.stdout.splitlines() == [
        f"created {PRODUCTION}", f"{MAINTAINER}: EDIT on {PRODUCTION}",
        f"{MEMBER}: DENY on {PRODUCTION}",
    ]  # fmt: skip

    # the member is refused, by the command and by the server itself
    refused = promote_as(team, MEMBER, "--run", team.good)
    assert refused.returncode == 1
    assert f"does not let user '{MEMBER}' use {PRODUCTION}" in refused.stderr
    assert "only its maintainers may promote or roll back" in refused.stderr
    with pytest.MonkeyPatch.context() as patch:
        for key, value in team.env[MEMBER].items():
            patch.setenv(key, value)
        client = MlflowClient(tracking_uri=team.server.url)
        model_id = client.get_run(team.good).data.tags["imgpipe.model_id"]
        with pytest.raises(mlflow.exceptions.MlflowException, match="Permission denied"):
            client.create_model_version(
                PRODUCTION, f"models:/{model_id}", run_id=team.good, model_id=model_id
            )

    # the maintainer promotes: first champion, then the better model
    first = promote_as(team, MAINTAINER, "--run", team.weak)
    assert first.returncode == 0, first.stderr
    second = promote_as(team, MAINTAINER, "--run", team.good)
    assert second.returncode == 0, second.stderr
    assert "(better; on 297 test images" in second.stdout
    with pytest.MonkeyPatch.context() as patch:
        for key, value in team.env[MAINTAINER].items():
            patch.setenv(key, value)
        client = MlflowClient(tracking_uri=team.server.url)
        found = client.get_registered_model(PRODUCTION)
        assert {a: str(v) for a, v in found.aliases.items()} == {"champion": "2", "previous": "1"}
        assert client.get_model_version(PRODUCTION, "2").tags["imgpipe.promoted_by"] == MAINTAINER
        run = client.get_run(team.good)  # the run's user: the member who logged it
        assert run.data.tags["mlflow.user"] == MEMBER == run.info.user_id
        assert {entry.dataset.name for entry in run.inputs.dataset_inputs} == {
            "gray8/train", "gray8/val",
        }  # fmt: skip
    rollback = promote_as(team, MAINTAINER, "--rollback")
    assert rollback.returncode == 0, rollback.stderr
    assert "champion is version 1 again, previous is version 2" in rollback.stdout
    assert promote_as(team, MEMBER, "--rollback").returncode == 1


@pytest.mark.slow
def test_a_read_grant_is_lifted_to_the_servers_default_so_members_are_denied(team: Team) -> None:
    """Why set-up denies members instead of granting READ: with the team server's
    default_permission EDIT, MLflow 3.17 folds a READ grant up to EDIT (a positive grant never
    resolves below the default), and the user can still move an alias. Pinned, so an MLflow
    that honours READ shows up here."""
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    scratch = "imgpipe-scratch-production"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in team.env["admin"].items():
            patch.setenv(key, value)
        admin = MlflowClient(tracking_uri=team.server.url)
        admin.create_registered_model(scratch)
        model_id = admin.get_run(team.weak).data.tags["imgpipe.model_id"]
        admin.create_model_version(
            scratch, f"models:/{model_id}", run_id=team.weak, model_id=model_id
        )
        auth = get_app_client("basic-auth", tracking_uri=team.server.url)
        auth.grant_user_permission(READER, "registered_model", scratch, "READ")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in team.env[READER].items():
            patch.setenv(key, value)
        reader = MlflowClient(tracking_uri=team.server.url)
        reader.set_registered_model_alias(scratch, "champion", "1")
        assert reader.get_model_version_by_alias(scratch, "champion").version == "1"
