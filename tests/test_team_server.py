"""The team's MLflow server as docs/team.md sets it up: `scripts/team-server` starts PostgreSQL in a
temporary folder and `mlflow server` with logins on it; a member's `dvc repro` and four parallel
queued experiments (`dvc queue start -j 2`) log to it, and four more to the default SQLite store.

Slow: one server and one small project (raw digits, numpy_mlp only: no TensorFlow) for the whole
module, started on free 127.0.0.1 ports and stopped at the end. Needs Debian's postgresql package
(initdb, postgres): skipped without it, a failure under CI.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import shutil
import ssl
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support import command_env, free_port, run, stages_run
from tests.team_support import TEAM_SERVER, TeamServer, make_project, team_server

SCRIPT = TEAM_SERVER
EXPERIMENT = "imgpipe"
MODEL = "numpy_mlp"
REGISTERED = f"{EXPERIMENT}-{MODEL}"
MEMBER = "alice"
# four queued variations per store; each reruns train@numpy_mlp and evaluate@numpy_mlp only
SQLITE_VARIATIONS = (
    "numpy_mlp.learning_rate=0.003",
    "numpy_mlp.learning_rate=0.03",
    "numpy_mlp.hidden_units=[16]",
    "numpy_mlp.dropout=0.0",
)
SERVER_VARIATIONS = (
    "numpy_mlp.learning_rate=0.002",
    "numpy_mlp.learning_rate=0.02",
    "numpy_mlp.hidden_units=[24]",
    "numpy_mlp.dropout=0.1",
)

pytestmark = pytest.mark.slow


@contextmanager
def env_vars(**values: str) -> Iterator[None]:
    """Set environment variables of this process for a block (MLflow clients read them)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in values.items():
            patch.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def server() -> Iterator[TeamServer]:
    """`scripts/team-server start` in a fresh folder on two free ports; HTTPS with the
    certificate it makes; passwords generated."""
    with team_server() as running:
        yield running


def verified(server: TeamServer) -> ssl.SSLContext:
    """A TLS context that trusts the server's certificate, as members' clients do."""
    return ssl.create_default_context(cafile=server.cert)


def admin_env(server: TeamServer) -> dict[str, str]:
    """The admin's login and the server's certificate, as MLflow's client reads them."""
    return {
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": server.secrets["admin_password"],
        "MLFLOW_TRACKING_SERVER_CERT_PATH": str(server.cert),
    }


def sql_count(server: TeamServer, query: str, *args: object, database: str = "mlflow") -> int:
    """One count straight from PostgreSQL (not through MLflow), as the role `mlflow`."""
    import psycopg

    with psycopg.connect(
        host="127.0.0.1",
        port=server.db_port,
        user="mlflow",
        password=server.secrets["db_password"],
        dbname=database,
    ) as connection:
        return connection.execute(query, args).fetchone()[0]


@pytest.fixture(scope="module")
def member(server: TeamServer) -> dict[str, str]:
    """A member's account, made by the admin through MLflow's auth API (docs/team.md's recipe),
    and the environment a member's `dvc repro` runs with."""
    from mlflow.server import get_app_client

    password = "alice-" + os.urandom(9).hex()
    with env_vars(**admin_env(server)):
        get_app_client("basic-auth", tracking_uri=server.url).create_user(MEMBER, password)
    return {
        **command_env(),
        "MLFLOW_TRACKING_URI": server.url,
        "MLFLOW_TRACKING_USERNAME": MEMBER,
        "MLFLOW_TRACKING_PASSWORD": password,
        "MLFLOW_TRACKING_SERVER_CERT_PATH": str(server.cert),  # docs/team.md's members' recipe
    }


@dataclass(frozen=True)
class Project:
    """The member's project after one `dvc repro` logged to the server."""

    origin: Path
    repro_output: str


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, member: dict[str, str]) -> Project:
    """Raw digits and numpy_mlp only; `dvc repro` with the server's URL and the member's login."""
    origin = tmp_path_factory.mktemp("origin")
    make_project(origin, models=(MODEL,))
    output = run(["dvc", "repro"], origin, member)
    run(["git", "add", "-A"], origin, member)
    run(["git", "commit", "-q", "-m", "dvc repro"], origin, member)
    return Project(origin, output)


def run_id_of(repo: Path) -> str:
    """The MLflow run id that train@numpy_mlp wrote next to the model."""
    return json.loads((repo / "models" / MODEL / "mlflow_run.json").read_text())["run_id"]


# --------------------------------------------------------------------------- the server


def test_secrets_are_private_and_requests_without_a_login_are_refused(
    server: TeamServer,
) -> None:
    for name in ("secrets", "basic_auth.ini"):
        assert stat.S_IMODE((server.folder / name).stat().st_mode) == 0o600, name
    search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    with pytest.raises(urllib.error.HTTPError, match="HTTP Error 401"):
        urllib.request.urlopen(search, timeout=10, context=verified(server))
    request = urllib.request.Request(search)
    with env_vars(**admin_env(server)):
        from imgpipe.tracking.connection import credentials_header

        request.headers.update(credentials_header())
    with urllib.request.urlopen(request, timeout=10, context=verified(server)) as answer:
        assert answer.status == 200
    # no password on any process's command line (PostgreSQL's, MLflow's, the script's)
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            text = Path(cmdline).read_bytes().decode(errors="replace")
        except OSError:
            continue  # a process that ended meanwhile
        for key, secret in server.secrets.items():
            assert secret not in text, f"{key} on the command line of {cmdline}"


def test_https_is_verified_with_the_servers_certificate_and_refused_without_it(
    server: TeamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import requests

    from imgpipe.tracking import connection

    assert requests.get(f"{server.url}/health", verify=server.cert, timeout=10).text == "OK"
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(f"{server.url}/health", timeout=10)  # the system's CAs do not vouch for it
    with pytest.raises(requests.exceptions.ConnectionError):  # no plain HTTP on that port
        requests.get(f"{server.url.replace('https:', 'http:')}/health", timeout=10)
    # imgpipe's own checks before a stage: verified with the member's certificate, and
    # refused without it, before any login is sent
    for name, value in admin_env(server).items():
        monkeypatch.setenv(name, value)
    assert connection.unreachable_reason(server.url) is None
    assert connection.login_problem(server.url) is None
    monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
    refused = r"could not be verified against this machine's trusted CAs .*self.signed"
    with pytest.raises(connection.TrackingCertificateError, match=refused) as caught:
        connection.unreachable_reason(server.url)
    assert "MLFLOW_TRACKING_SERVER_CERT_PATH" in str(caught.value)
    import certifi  # public CAs: certificates, but not the server's

    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", certifi.where())
    with pytest.raises(connection.TrackingCertificateError, match="in MLFLOW_TRACKING_SERVER"):
        connection.unreachable_reason(server.url)
    not_pem = server.folder.parent / "not-a-certificate.pem"
    not_pem.write_text("not a certificate\n")
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(not_pem))
    with pytest.raises(connection.TrackingCertificateError, match="is not a readable PEM"):
        connection.unreachable_reason(server.url)


def process_tree(root: int) -> dict[int, tuple[int, str]]:
    """{pid: (real uid, command line)} of root's descendants, from /proc."""
    parents, found = {}, {}
    for stat_file in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat_file).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat_file.split("/")[2])] = int(fields[1])
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor is not None and ancestor != root:
            ancestor = parents.get(ancestor)
        if ancestor == root:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            uid = int(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1))
            found[pid] = (uid, cmdline.decode(errors="replace"))
    return found


def test_no_server_process_runs_as_root(server: TeamServer) -> None:
    import pwd

    tree = process_tree(server.process.pid)
    mlflow_uid = pwd.getpwnam("imgpipe-mlflow").pw_uid if os.geteuid() == 0 else os.geteuid()
    servers = [uid for uid, cmdline in tree.values() if "uvicorn" in cmdline]
    assert servers and set(servers) == {mlflow_uid}, tree
    assert any("postgres -D" in cmdline for _, cmdline in tree.values()), tree
    assert all(uid != 0 for uid, _ in tree.values()), tree  # only `start` itself is root
    key = server.folder / "tls" / "key.pem"
    assert (key.stat().st_uid, stat.S_IMODE(key.stat().st_mode)) == (mlflow_uid, 0o600)


def test_repro_logs_runs_histories_models_and_versions_into_postgresql(
    server: TeamServer, member: dict[str, str], project: Project
) -> None:
    from mlflow.tracking import MlflowClient

    assert stages_run(project.repro_output) >= {f"train@{MODEL}", f"evaluate@{MODEL}"}
    run_id = run_id_of(project.origin)
    epochs = yaml.safe_load((project.origin / "params.yaml").read_text())[MODEL]["epochs"]
    with env_vars(**{k: v for k, v in member.items() if k.startswith("MLFLOW_")}):
        client = MlflowClient(tracking_uri=server.url)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied
        found = client.get_run(run_id)
        assert found.info.status == "FINISHED"
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert steps == list(range(epochs)), key
        metrics_file = json.loads((project.origin / "metrics" / f"{MODEL}.json").read_text())
        assert found.data.metrics["test_accuracy"] == pytest.approx(metrics_file["accuracy"])
        logged = client.search_logged_models(experiment_ids=[experiment.experiment_id])
        assert [m.source_run_id for m in logged] == [run_id]
        (version,) = client.search_model_versions(f"name = '{REGISTERED}'")
        assert version.run_id == run_id
        assert found.data.tags["registered_model"] == f"{REGISTERED}/{version.version}"
    # the rows are in PostgreSQL itself (the member's account too), the artifacts in the folder
    users = "SELECT count(*) FROM users WHERE username = %s"
    assert sql_count(server, users, MEMBER, database="mlflow_auth") == 1
    assert sql_count(server, "SELECT count(*) FROM runs WHERE run_uuid = %s", run_id) == 1
    history = "SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'val_accuracy'"
    assert sql_count(server, history, run_id) == epochs
    versions = "SELECT count(*) FROM model_versions WHERE name = %s AND run_id = %s"
    assert sql_count(server, versions, REGISTERED, run_id) == 1
    assert sql_count(server, "SELECT count(*) FROM logged_models") == 1
    assert list((server.folder / "artifacts").rglob("MLmodel"))
    assert list((server.folder / "artifacts").rglob("confusion.png"))


@pytest.mark.parametrize(
    ("login", "says"),
    [
        ({"MLFLOW_TRACKING_PASSWORD": "not-the-password"}, f"refused the login of user '{MEMBER}'"),
        ({"MLFLOW_TRACKING_USERNAME": "", "MLFLOW_TRACKING_PASSWORD": ""}, "asks for a login"),
    ],
)
def test_a_refused_login_stops_the_stage_with_one_line_that_says_what_to_do(
    member: dict[str, str], project: Project, tmp_path: Path, login: dict[str, str], says: str
) -> None:
    args = ["python", "-m", "stages.train", "--model", MODEL, "--tables", "data/tables/gray16"]
    args += ["--out", str(tmp_path / "model")]
    result = subprocess.run(
        args, cwd=project.origin, env={**member, **login}, capture_output=True, text=True
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in output
    (message,) = [line for line in output.splitlines() if "MLflow server" in line]
    assert message.startswith(f"[train@{MODEL}] MLflow server ")
    assert (
        says in message and "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in message
    )
    assert message.endswith("nothing was done.")
    assert "not-the-password" not in output
    assert not (tmp_path / "model").exists()


# --------------------------------------------------------------------------- parallel experiments


def queue_and_run(origin: Path, env: dict[str, str], variations: tuple[str, ...]) -> list[str]:
    """Queue one experiment per `-S` variation, run the queue with `dvc queue start -j 2`, wait
    until it is done and its workers are gone; the experiments' names, each a success."""
    names = []
    for variation in variations:
        queued = run(["dvc", "exp", "run", "--queue", "-S", variation], origin, env)
        names += re.findall(r"Queued experiment '([^']+)'", queued)
    assert len(names) == len(variations)
    run(["dvc", "queue", "start", "-j", "2"], origin, env)
    deadline = time.monotonic() + 600
    while True:
        status = run(["dvc", "queue", "status"], origin, env)
        idle = re.search(r"Worker status: 0 active, 0 idle", status)
        if idle and not re.search(r"\b(Queued|Running)\b", status):
            break
        assert time.monotonic() < deadline, f"queue not done after 600 s:\n{status}"
        time.sleep(3)
    for name in names:
        line = next(line for line in status.splitlines() if f" {name} " in f" {line} ")
        assert "Success" in line, (
            f"{name}:\n{status}\n{run(['dvc', 'queue', 'logs', name], origin, env)}"
        )
    return names


def shown_accuracy(origin: Path, env: dict[str, str]) -> dict[str, float]:
    """{experiment name: test accuracy} as `dvc exp show --json` reports it."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], origin, env))
    accuracy = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for revision in experiment["revs"]:
                data = revision["data"]["metrics"][f"metrics/{MODEL}.json"]["data"]
                accuracy[revision["name"]] = data["accuracy"]
    return accuracy


def check_parallel_runs(client, names: list[str], shown: dict[str, float], before: int) -> list:
    """Each experiment has exactly one finished run with its metric history, test accuracy (as
    `dvc exp show` says) and registered version; 4 new runs and versions, none twice, and at least
    two runs overlapped in time (the queue really ran them in parallel)."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    all_runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert len(all_runs) == before + len(names)  # none lost, none extra
    runs = []
    for name in names:
        (found,) = [r for r in all_runs if r.data.tags.get("dvc_experiment") == name]
        assert found.info.status == "FINISHED"
        assert found.info.run_name == f"{MODEL}-{name}"
        assert found.data.metrics["test_accuracy"] == pytest.approx(shown[name])
        steps = [m.step for m in client.get_metric_history(found.info.run_id, "val_accuracy")]
        assert steps == sorted(set(steps)) and steps  # one value per epoch, none twice
        runs.append(found)
    versions = client.search_model_versions(f"name = '{REGISTERED}'")
    new = [v for v in versions if v.run_id in {r.info.run_id for r in runs}]
    assert len(new) == len(names) and len({v.version for v in versions}) == len(versions)
    for found in runs:
        (version,) = [v for v in new if v.run_id == found.info.run_id]
        assert found.data.tags["registered_model"] == f"{REGISTERED}/{version.version}"
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))
    return runs


@pytest.fixture(scope="module")
def sqlite_experiments(project: Project) -> list[str]:
    """Four experiments run two at a time, logging to the project's own mlflow.db."""
    env = command_env()  # no MLFLOW_TRACKING_URI: the default store
    return queue_and_run(project.origin, env, SQLITE_VARIATIONS)


@pytest.fixture(scope="module")
def server_experiments(project: Project, member: dict[str, str], server: TeamServer) -> list[str]:
    """Four experiments run two at a time, logging to the server with the member's login."""
    return queue_and_run(project.origin, member, SERVER_VARIATIONS)


def test_parallel_experiments_all_land_once_in_the_default_sqlite_store(
    project: Project, sqlite_experiments: list[str]
) -> None:
    from mlflow.tracking import MlflowClient

    store = project.origin / "mlflow.db"
    assert store.exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    shown = shown_accuracy(project.origin, command_env())
    runs = check_parallel_runs(client, sqlite_experiments, shown, before=0)
    assert {r.data.params[f"{MODEL}.learning_rate"] for r in runs} == {"0.003", "0.03", "0.01"}


def test_parallel_experiments_all_land_once_on_the_server(
    server: TeamServer,
    member: dict[str, str],
    project: Project,
    server_experiments: list[str],
) -> None:
    from mlflow.tracking import MlflowClient

    shown = shown_accuracy(project.origin, member)
    with env_vars(**{k: v for k, v in member.items() if k.startswith("MLFLOW_")}):
        client = MlflowClient(tracking_uri=server.url)
        runs = check_parallel_runs(client, server_experiments, shown, before=1)
    assert {r.data.params[f"{MODEL}.learning_rate"] for r in runs} == {"0.002", "0.02", "0.01"}
    tagged = (
        "SELECT count(*) FROM tags WHERE key = 'dvc_experiment' AND value = ANY(%s)"  # in SQL too
    )
    assert sql_count(server, tagged, server_experiments) == len(server_experiments)
    assert sql_count(server, "SELECT count(*) FROM model_versions") == 1 + len(server_experiments)


# --------------------------------------------------------------------------- no password anywhere


def test_no_password_in_params_logs_mlflow_or_git(
    server: TeamServer,
    member: dict[str, str],
    project: Project,
    sqlite_experiments: list[str],
    server_experiments: list[str],
) -> None:
    from mlflow.tracking import MlflowClient

    passwords = {
        "member": member["MLFLOW_TRACKING_PASSWORD"],
        "admin": server.secrets["admin_password"],
        "database": server.secrets["db_password"],
    }
    tracked = run(["git", "ls-files"], project.origin, member).split()
    assert "params.yaml" in tracked
    for path in project.origin.rglob("*"):  # the working tree, DVC's cache and queue logs
        if path.is_file() and not path.is_symlink() and ".git" not in path.parts:
            data = path.read_bytes()
            for who, password in passwords.items():
                assert password.encode() not in data, f"{who} password in {path}"
    for who, password in passwords.items():
        assert password not in project.repro_output, f"{who} password in the repro log"
        found = subprocess.run(["git", "grep", "-q", password, "HEAD"], cwd=project.origin)
        assert found.returncode == 1, f"{who} password in git"
    with env_vars(**{k: v for k, v in member.items() if k.startswith("MLFLOW_")}):
        client = MlflowClient(tracking_uri=server.url)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([experiment.experiment_id])
    logged = json.dumps([[r.data.params, r.data.tags] for r in runs])
    for who, password in passwords.items():
        assert password not in logged, f"{who} password in an MLflow param or tag"
    for path in (server.folder / "artifacts").rglob("*"):
        if path.is_file():
            assert not any(p.encode() in path.read_bytes() for p in passwords.values()), path
    for log in server.folder.parent.glob("*.log"):  # the script's and MLflow's output
        text = log.read_text(errors="replace")
        assert not any(password in text for password in passwords.values()), log


# --------------------------------------------------------------------------- the folder


def start_refused(folder: Path, *extra: str) -> str:
    """`team-server start FOLDER` that must stop at once with status 1: its output."""
    args = [str(SCRIPT), "start", str(folder), "--port", str(free_port())]
    args += ["--db-port", str(free_port()), *extra]
    result = subprocess.run(args, env=command_env(), capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    return output


@pytest.fixture
def fresh_folder(tmp_path: Path) -> Path:
    """An empty server folder that only its owner may write to."""
    folder = tmp_path / "server"
    folder.mkdir(mode=0o755)
    return folder


def test_a_secrets_file_others_may_read_is_refused(fresh_folder: Path) -> None:
    secrets = fresh_folder / "secrets"
    secrets.write_text("db_password=x\nadmin_password=y\nflask_secret_key=z\n")
    secrets.chmod(0o644)
    output = start_refused(fresh_folder)
    assert "may be read by group or others (mode 0644)" in output
    assert f"chmod 600 {secrets}" in output
    assert not (fresh_folder / "postgres").exists()  # nothing was started
    assert secrets.read_text().startswith("db_password=x")


def test_a_key_others_may_read_is_refused(fresh_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    (tmp_path / "key.pem").chmod(0o640)
    output = start_refused(
        fresh_folder, "--cert", str(tmp_path / "cert.pem"), "--key", str(tmp_path / "key.pem")
    )
    assert "the key file" in output and f"chmod 600 {tmp_path / 'key.pem'}" in output


@pytest.mark.parametrize("name", ["postgres.log", "secrets", "tls/key.pem"])
def test_a_symbolic_link_in_the_folder_is_refused(
    fresh_folder: Path, tmp_path: Path, name: str
) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("not the script's\n")
    target.chmod(0o600)
    (fresh_folder / name).parent.mkdir(exist_ok=True)
    (fresh_folder / name).symlink_to(target)
    output = start_refused(fresh_folder)
    assert f"{fresh_folder / name} is a symbolic link" in output
    assert f"rm {fresh_folder / name}" in output
    assert target.read_text() == "not the script's\n"
    assert not (fresh_folder / "postgres").exists()


def test_a_second_start_on_a_running_folder_is_refused(server: TeamServer) -> None:
    pid_file = server.folder / "team-server.pid"
    before = pid_file.read_text()
    output = start_refused(server.folder)
    assert f"a team server already runs in {server.folder} (process {server.process.pid})" in output
    assert f"stop it first (scripts/team-server stop {server.folder})" in output
    assert pid_file.read_text() == before  # the first one's pid file is kept
    assert requests_ok(server)


def requests_ok(server: TeamServer) -> bool:
    """The server answers /health over verified HTTPS."""
    import requests

    return requests.get(f"{server.url}/health", verify=server.cert, timeout=10).text == "OK"


@contextmanager
def bystander() -> Iterator[subprocess.Popen]:
    """A process of ours that is no team server (its PID goes into pid files)."""
    process = subprocess.Popen(["sleep", "300"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def stop_output(folder: Path) -> tuple[int, str]:
    """`team-server stop FOLDER`: its status and output."""
    result = subprocess.run(
        [str(SCRIPT), "stop", str(folder)],
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stdout + result.stderr


def test_stop_signals_no_process_but_the_one_start_started(
    server: TeamServer, fresh_folder: Path
) -> None:
    pid_file = server.folder / "team-server.pid"
    before = pid_file.read_text()
    with bystander() as other:
        pid_file.write_text(f"{other.pid}\n")  # a stale or foreign PID, the server still running
        try:
            status, output = stop_output(server.folder)
        finally:
            pid_file.write_text(before)
        assert status == 1 and "nothing was stopped" in output and str(other.pid) in output
        assert other.poll() is None and requests_ok(server)
        # a folder where no server runs (nobody holds its lock): a pid file names anything
        (fresh_folder / "team-server.lock").touch()
        (fresh_folder / "team-server.pid").write_text(f"{other.pid} 1\n")
        status, output = stop_output(fresh_folder)
        assert status == 0 and "no team server runs in" in output and other.poll() is None


# --------------------------------------------------------------------------- no password in outputs


def test_a_password_in_the_tracking_uri_is_in_no_output_and_no_log(
    member: dict[str, str], project: Project, server: TeamServer, tmp_path: Path
) -> None:
    password = member["MLFLOW_TRACKING_PASSWORD"]
    host = server.url.removeprefix("https://")
    env = {**member, "MLFLOW_TRACKING_URI": f"https://{MEMBER}:{password}@{host}"}
    del env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]  # the URI's login only
    copy = tmp_path / "copy"  # its run goes to an experiment of its own: the others count runs
    shutil.copytree(project.origin, copy, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["tracking"]["experiment"] = "imgpipe-redaction"
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    args = ["python", "-m", "stages.train", "--model", MODEL, "--tables", "data/tables/gray16"]
    args += ["--out", str(tmp_path / "model")]
    result = subprocess.run(args, cwd=copy, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    report = json.loads((tmp_path / "model" / "mlflow_run.json").read_text())
    assert report["tracking_uri"] == f"https://{MEMBER}:***@{host}"
    assert f"https://{MEMBER}:***@{host}" in output  # the log names the store, redacted
    assert password not in output
    for path in (tmp_path / "model").rglob("*"):
        assert path.is_dir() or password.encode() not in path.read_bytes(), path


# --------------------------------------------------------------------------- stop


def test_stop_stops_mlflow_and_postgresql(server: TeamServer) -> None:
    result = subprocess.run(
        [str(SCRIPT), "stop", str(server.folder)],
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert server.process.wait(timeout=10) == 0
    assert not (server.folder / "postgres" / "postmaster.pid").exists()  # a clean shutdown
    with pytest.raises(urllib.error.URLError, match="Connection refused"):  # nothing listens
        urllib.request.urlopen(f"{server.url}/health", timeout=5)
    log = next(server.folder.parent.glob("team-server-start-*.log")).read_text()
    assert "MLflow stopped" in log and "PostgreSQL stopped" in log  # in that order, by the script
