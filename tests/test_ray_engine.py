"""The `ray` engines on a real two-node Ray cluster started on loopback by these tests: tabulate
writes the same tables, byte for byte, as the local engine, also when a Ray worker is killed
mid-run; imgpipe-predict --engine ray writes the same CSV as the local engine.

The cluster (ray.cluster_utils.Cluster: a head node and a worker node, one CPU each, each its own
raylet and object store) lives for the module; the stages run as subprocesses that join it through
RAY_ADDRESS, as they would join a real cluster.
"""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from PIL import Image

from tests.support import BIN, ROOT, command_env, load_repo_params

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")

CLASSES = ("cat", "dog")
VIEWS = {
    "gray16": {"height": 16, "width": 16, "color": "grayscale"},
    "rgb24": {"height": 24, "width": 24, "color": "rgb"},
}
OBJECT_STORE_BYTES = 128 * 2**20  # per node: the tests move a few MB


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A head and a worker node on this machine; yields the address to put in RAY_ADDRESS."""
    from ray.cluster_utils import Cluster

    # no node_ip_address: Ray would still advertise the machine's address for the stage's
    # driver, which then could not find a raylet at 127.0.0.1
    node = {"num_cpus": 1, "object_store_memory": OBJECT_STORE_BYTES}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


def _image(label: int, seed: int, size: int) -> bytes:
    """A JPEG of noise, brighter for the second class."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 128, (size, size, 3), dtype=np.uint8) + 100 * label
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _project(root: Path, images_per_class: int, size: int) -> Path:
    """A project folder: class folders of JPEGs (and one corrupt file), params.yaml, the split."""
    raw = root / "raw"
    for label, name in enumerate(CLASSES):
        (raw / name).mkdir(parents=True)
        for number in range(images_per_class):
            (raw / name / f"{number:05d}.jpg").write_bytes(_image(label, number, size))
    params = load_repo_params()
    params["data"]["raw"] = str(raw)
    params["views"] = VIEWS
    params["models"] = {"dense": "gray16", "cnn": "rgb24"}
    params["tabulate"] = {"engine": "local", "workers": 2, "rows_per_group": 50}
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    _run(root, "stages.split", "--out", "split", "--report", "split-report.json")
    # passes split's check (it only reads the header) but fails to decode: a reported skip
    broken = root / "split" / "train" / "cat" / "zz-truncated.jpg"
    broken.write_bytes(_image(0, 999, size)[:300])
    return root


def _set_engine(project: Path, engine: str) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    params["tabulate"]["engine"] = engine
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")


def _run(project: Path, module: str, *arguments: str, ray_address: str | None = None) -> str:
    """Run `python -m module arguments` in the project; its stderr (the log)."""
    env = command_env()
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    result = subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=project,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def _tabulate(project: Path, out: str, engine: str, ray_address: str | None = None) -> str:
    _set_engine(project, engine)
    return _run(
        project, "stages.tabulate", "--split", "split", "--out", out, ray_address=ray_address
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small project, tabulated once with the local engine into local-tables/."""
    project = _project(tmp_path_factory.mktemp("ray-project"), images_per_class=150, size=40)
    _tabulate(project, "local-tables", "local")
    return project


def test_tables_are_byte_identical_on_a_two_node_cluster(project: Path, cluster: str) -> None:
    log = _tabulate(project, "ray-tables", "ray", ray_address=cluster)
    assert "Ray Data on the Ray cluster at" in log and "2 CPUs on 2 node(s)" in log
    local, on_ray = _files(project / "local-tables"), _files(project / "ray-tables")
    assert sorted(local) == sorted(
        ["skipped.json"] + [f"{v}/{s}.parquet" for v in VIEWS for s in ("train", "val", "test")]
    )
    assert local == on_ray  # every table and the skipped-file report
    assert b"zz-truncated.jpg" in local["skipped.json"]


def test_without_ray_address_a_local_ray_is_started(project: Path) -> None:
    log = _tabulate(project, "local-ray-tables", "ray")
    assert "Ray Data on a local Ray instance (2 CPUs on 1 node(s))" in log
    assert _files(project / "local-ray-tables") == _files(project / "local-tables")


def test_without_ray_installed_the_error_says_how_to_install_it(project: Path) -> None:
    _set_engine(project, "ray")
    code = (
        "import sys; sys.modules['ray'] = None\n"  # what `import ray` meets without the extra
        "from stages.tabulate import main; main(['--split', 'split', '--out', 'no-ray'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=project,
        env={**command_env(), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert 'pip install -e ".[ray]"' in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / "no-ray").exists()


def _decoding_workers() -> list[psutil.Process]:
    """Ray worker processes running a decoding task now (Ray titles them ray::<task>)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if cmdline.startswith("ray::") and "ray_decode_batch" in cmdline:
            found.append(process)
    return found


def test_a_worker_killed_mid_run_is_retried_to_the_same_tables(
    tmp_path: Path, cluster: str
) -> None:
    project = _project(tmp_path, images_per_class=600, size=160)
    _tabulate(project, "local-tables", "local")
    killed: list[int] = []
    done = threading.Event()

    def kill_one_decoding_worker() -> None:
        while not done.is_set() and not killed:
            for process in _decoding_workers():
                process.kill()  # SIGKILL, mid-task
                killed.append(process.pid)
                break
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one_decoding_worker, daemon=True)
    killer.start()
    try:
        _tabulate(project, "ray-tables", "ray", ray_address=cluster)
    finally:
        done.set()
        killer.join()
    assert killed, "no decoding worker was seen running: the run was over too soon to kill one"
    assert _files(project / "ray-tables") == _files(project / "local-tables")


def test_predict_engine_ray_writes_the_local_engines_csv(project: Path, cluster: str) -> None:
    """imgpipe-predict --engine ray on a folder and on a Parquet table, against --engine local."""
    _set_engine(project, "local")
    _run(
        project,
        "stages.train",
        "--model",
        "dense",
        "--tables",
        "local-tables/gray16",
        "--out",
        "models/dense",
    )
    env = {**command_env(), "PYTHONPATH": str(ROOT)}
    outputs = {}
    for engine in ("local", "ray"):
        for name, source in (
            ("folder", "split/test"),
            ("table", "local-tables/gray16/test.parquet"),
        ):
            out = project / f"{engine}-{name}.csv"
            result = subprocess.run(
                [
                    str(BIN / "imgpipe-predict"),
                    "models/dense",
                    source,
                    "split/train/cat",
                    "--engine",
                    engine,
                    "--out",
                    str(out),
                ],
                cwd=project,
                env={**env, "RAY_ADDRESS": cluster} if engine == "ray" else env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert result.returncode == 0, result.stderr[-3000:]
            outputs[engine, name] = (out.read_text(encoding="utf-8"), result.stdout, result.stderr)
    for name in ("folder", "table"):
        local, on_ray = outputs["local", name], outputs["ray", name]
        assert "classifying on the Ray cluster at" in on_ray[2]
        assert "(2 CPUs on 2 node(s))" in on_ray[2]
        assert local[0] == on_ray[0]  # the CSV, row for row
        assert local[1] == on_ray[1]  # the printed rows
        rows = local[0].splitlines()
        assert rows[0] == "path,label,probability" and len(rows) > 100
        # the truncated file is reported the same way by both engines
        assert (
            "zz-truncated.jpg: skipped:" in local[2] and "zz-truncated.jpg: skipped:" in on_ray[2]
        )


def test_an_unreachable_ray_address_fails_at_once_with_what_to_do(project: Path) -> None:
    _set_engine(project, "ray")
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "stages.tabulate", "--split", "split", "--out", "nowhere"],
        cwd=project,
        env={**command_env(), "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "127.0.0.1:9"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "nothing answers at RAY_ADDRESS=127.0.0.1:9" in result.stderr
    assert "ray start --head" in result.stderr
    assert time.perf_counter() - started < 60  # ray.init alone retries for minutes
    assert not (project / "nowhere").exists()
