"""What every benchmark shares: the machine line, the data arguments, a throw-away project whose
stages run as DVC runs them, timing and peak memory, Markdown tables, and the targets with the
exit status.

A benchmark imports it as `from benchmarks import harness` once the repository is on sys.path;
no benchmark imports another.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import yaml

if TYPE_CHECKING:
    import keras

    from imgpipe.registry import TrainingData

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RAW = REPO.parent / "shared" / "data" / "dogs-vs-cats" / "train.zip"
MB = 1e6
SAMPLE_SECONDS = 0.02  # how often measure() samples the process tree's memory
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the CPU flags that decide the speed
LIBRARIES = {  # import name: the name the machine line gives it
    "PIL": "Pillow",
    "pyarrow": "pyarrow",
    "tensorflow": "TensorFlow",
    "keras": "Keras",
    "mlflow": "MLflow",
    "ray": "Ray",
}


# --------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown CPU"


def machine(*libraries: str) -> str:
    """The machine line: CPU model, cores, memory, GPUs (with TensorFlow), the CPU flags in FLAGS,
    Python and the versions of `libraries` (import names, keys of LIBRARIES), the load average.
    """
    from imgpipe.precision import cpu_flags
    from imgpipe.runtime import cpu_count

    hardware = (
        f"{cpu_model()}, {cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    )
    if "tensorflow" in libraries:
        import tensorflow as tf

        hardware += f", {len(tf.config.list_physical_devices('GPU'))} GPU(s)"
    flags = cpu_flags()
    shown = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in FLAGS)
    versions = [f"Python {sys.version.split()[0]}"]
    for name in libraries:
        versions.append(f"{LIBRARIES[name]} {importlib.import_module(name).__version__}")
    return (
        f"machine: {hardware}; {shown}; {', '.join(versions)}; "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )


def print_machine(*libraries: str) -> None:
    """Print machine(*libraries) at once (the rest of a benchmark's output may take minutes)."""
    print(machine(*libraries), flush=True)


# --------------------------------------------------------------------------- arguments


def argument_parser(
    description: str, *, repeats: int, repeats_help: str
) -> argparse.ArgumentParser:
    """A benchmark's parser, its --help the benchmark's docstring, with the arguments they all
    take: --raw (the images, default the shared Dogs-vs-Cats zip), --images (how many) and
    --repeats (how many times each timed step runs)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--raw", type=Path, default=DEFAULT_RAW, help="zip or folder of images")
    parser.add_argument("--images", type=int, default=None, help="how many (default: all)")
    parser.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    return parser


def existing_raw(raw: Path) -> Path:
    """--raw made absolute; stops with what to do when it does not exist."""
    if not raw.exists():
        raise SystemExit(f"{raw} not found: pass --raw (a zip or a folder of class folders)")
    return raw.resolve()


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Measurement:
    """Cost of one process run."""

    wall_s: float
    peak_tree_rss: int  # bytes: max over time of the summed RSS of the process tree
    peak_single_rss: int  # bytes: the largest ru_maxrss of any one process of the tree
    cpu_s: float  # user + system CPU seconds of the whole tree
    others_cpu_s: float  # CPU seconds that other processes of the machine used meanwhile


def measure(
    command: Sequence[str], *, cwd: Path, log: Path, env: dict | None = None
) -> Measurement:
    """Run a command to completion, sampling the RSS of its process tree; fail on non-zero exit."""
    with open(log, "ab") as log_file:
        log_file.write(f"$ {' '.join(map(str, command))}\n".encode())
        log_file.flush()
        busy_before = machine_busy_seconds()
        started = time.perf_counter()
        process = subprocess.Popen(
            [str(c) for c in command],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        peak = [0]
        done = threading.Event()
        sampler = threading.Thread(target=_sample_tree, args=(process.pid, peak, done))
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)  # blocks; rusage covers reaped descendants
        wall = time.perf_counter() - started
        busy = machine_busy_seconds() - busy_before
        done.set()
        sampler.join()
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(map(str, command))} failed ({process.returncode}):\n{tail}")
    cpu = usage.ru_utime + usage.ru_stime
    others = max(0.0, busy - cpu)
    return Measurement(wall, peak[0], usage.ru_maxrss * 1024, cpu, others)  # maxrss in KiB


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine have spent busy since boot."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _sample_tree(pid: int, peak: list[int], done: threading.Event) -> None:
    root = psutil.Process(pid)
    tree: list[psutil.Process] = []
    samples = 0
    while not done.is_set():
        if samples % 10 == 0:  # new worker processes appear rarely: refresh the list every 0.2 s
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
        total = 0
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        peak[0] = max(peak[0], total)
        samples += 1
        done.wait(SAMPLE_SECONDS)


def median_run(run: Callable[[], Measurement], repeats: int) -> Measurement:
    """Median wall time and the highest peaks of `repeats` runs."""
    runs = [run() for _ in range(repeats)]
    return Measurement(
        statistics.median(r.wall_s for r in runs),
        max(r.peak_tree_rss for r in runs),
        max(r.peak_single_rss for r in runs),
        statistics.median(r.cpu_s for r in runs),
        statistics.median(r.others_cpu_s for r in runs),
    )


def timed(function: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds of function() in this process, and the CPU seconds the machine's other
    processes used meanwhile."""
    me = psutil.Process()
    busy, mine = machine_busy_seconds(), sum(me.cpu_times()[:2])
    started = time.perf_counter()
    function()
    seconds = time.perf_counter() - started
    return seconds, machine_busy_seconds() - busy - (sum(me.cpu_times()[:2]) - mine)


def tree_size(path: Path, pattern: str = "*") -> int:
    """Bytes of the files under path matching pattern."""
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def count_files(path: Path) -> int:
    """Files under path (not counting hidden ones)."""
    return sum(1 for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


# --------------------------------------------------------------------------- projects


@dataclass(frozen=True)
class View:
    """The image view benchmarked."""

    size: int
    color: str

    @property
    def name(self) -> str:
        return f"{'gray' if self.color == 'grayscale' else 'rgb'}{self.size}"

    @property
    def channels(self) -> int:
        from imgpipe.images import channel_count

        return channel_count(self.color)


def class_count(raw: Path) -> int:
    """Number of classes in the raw data, as the split stage will see them."""
    from imgpipe.images import RawSource, assign_labels, is_system_file

    entries, _ = assign_labels(f for f in RawSource(raw).list_files() if not is_system_file(f))
    return len({e.label for e in entries})


def write_params(
    project: Path, *, raw: Path, view: View | None, images: int | None, **overrides
) -> None:
    """project/params.yaml: the repository's, on `raw`, capped to `images` (None: all), with only
    `view` (None: every view as it is) and `overrides` ({section}__{key}=value)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["raw"] = str(raw)
    per_class = None
    if images is not None:  # raw may be relative to the project
        per_class = max(1, images // class_count(project / raw))
    params["split"]["max_per_class"] = per_class
    if view is not None:
        params["views"] = {
            view.name: {"height": view.size, "width": view.size, "color": view.color}
        }
        params["models"] = {model: view.name for model in params["models"]}
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        params[section][key] = value
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def stage_env() -> dict[str, str]:
    """Environment of a stage process: the repository's code, quiet logs."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "3"}


def run_split(project: Path, log: Path) -> Measurement:
    """The split stage, as dvc.yaml runs it, in `project`."""
    command = [sys.executable, "-m", "stages.split", "--out", "data/split"]
    command += ["--report", "data/split-report.json"]
    return measure(command, cwd=project, log=log, env=stage_env())


def run_tabulate(
    project: Path, split_dir: Path, log: Path, env: dict[str, str] | None = None
) -> Measurement:
    """The tabulate stage, as dvc.yaml runs it, in `project` (`env`: more variables)."""
    command = [sys.executable, "-m", "stages.tabulate", "--split", split_dir]
    command += ["--out", "data/tables"]
    return measure(command, cwd=project, log=log, env={**stage_env(), **(env or {})})


def tabulated_project(project: Path, log: Path, *, raw: Path, view: View, images: int | None):
    """A project with one view, split and tabulated: the folder of its view's tables."""
    write_params(project, raw=raw, view=view, images=images)
    run_split(project, log)
    run_tabulate(project, project / "data" / "split", log)
    return project / "data" / "tables" / view.name


def fresh_model(model: str, section: Any, data: TrainingData, *, seed: int) -> keras.Model:
    """A Keras model as the train stage makes it for `data`: seeded, built and compiled, in
    section.precision (`auto`: float32; the stage's own choice is not what is timed here)."""
    from imgpipe.keras_training import seed_everything
    from imgpipe.registry import model_type

    precision = "float32" if section.precision == "auto" else section.precision
    seed_everything(seed)
    return model_type(model).compiled_model(
        section, data.image_shape, data.num_classes, train_size=data.train_size, precision=precision
    )


# --------------------------------------------------------------------------- printing


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A Markdown table, so that it can be pasted into the docs as printed."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        print("| " + " | ".join(cells) + " |")


# --------------------------------------------------------------------------- targets


class Targets:
    """The targets of one run, in the order checked; each is printed `met` or `MISSED` as it
    is checked."""

    def __init__(self) -> None:
        self.checked: list[tuple[str, bool, str]] = []  # (label, met, detail)

    @staticmethod
    def line(label: str, ok: bool, detail: str) -> str:
        """`  [met] label: detail`, or `[MISSED]`."""
        return f"  [{'met' if ok else 'MISSED'}] {label}: {detail}"

    def check(self, label: str, ok: bool, detail: str) -> None:
        """Record a target and print whether it was met."""
        self.checked.append((label, ok, detail))
        print(self.line(label, ok, detail), flush=True)

    def info(self, detail: str) -> None:
        """Print a figure shown beside the targets, judged by none."""
        print(f"  [info] {detail}", flush=True)

    def summary(self, *, repeat: bool = False) -> int:
        """Print `N of M targets met` (after every target again, with `repeat`); the exit status:
        1 when one is missed, else 0."""
        if repeat:
            for checked in self.checked:
                print(self.line(*checked))
        missed = sum(not ok for _, ok, _ in self.checked)
        print(f"{len(self.checked) - missed} of {len(self.checked)} targets met", flush=True)
        return 1 if missed else 0
