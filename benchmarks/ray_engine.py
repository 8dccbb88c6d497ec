"""The ray engine's overhead on one machine: the tabulate stage with tabulate.engine `local`
against `ray`, on the same split, in one run (issue 14).

The project uses the repository's params.yaml as it is (every view, rows_per_group, workers) on
the real images of ../shared/data/dogs-vs-cats/train.zip (20,000). The split stage runs once;
then the tabulate stage runs --repeats times in each of three ways, in turn, each run a process
of its own as `dvc repro` runs it:

  local                        the forked decoding processes (the default)
  ray, joining a running Ray   RAY_ADDRESS names a Ray head started by this script on this
                               machine (one CPU per core), as a cluster's stage joins it
  ray, starting its own Ray    no RAY_ADDRESS: the stage starts a local Ray and stops it

"machine CPU s" is what every process of the machine used meanwhile (Ray's own processes are
not the stage's children). A local Ray started and stopped with no work is timed too: the fixed
cost that the third way pays on every run.

Target: the ray engine joining a running Ray within 2x the local engine's median wall time (the
engine's overhead; a per-run start is reported beside it). The tables of every run are compared
byte for byte. Ends with `met` or `MISSED`; exit status 1 on a miss.

  python benchmarks/ray_engine.py                    # all 20,000 images (about 5 minutes here)
  python benchmarks/ray_engine.py --images 2000      # a quick look (target stated for 20,000)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # imgpipe and benchmarks

from benchmarks import harness

# name: (tabulate.engine, whether it joins the Ray head this script starts through RAY_ADDRESS)
VARIANTS = {
    "local": ("local", False),
    "ray, joining a running Ray": ("ray", True),
    "ray, starting its own Ray": ("ray", False),
}
START_STOP = (
    "import logging, ray, ray.data\n"
    "ray.init(address='local', include_dashboard=False, logging_level=logging.WARNING)\n"
    "ray.data.DataContext.get_current().enable_progress_bars = False\n"
    "list(ray.data.from_items([{'a': 1}]).map_batches(lambda b: b).iter_batches())\n"
    "ray.shutdown()\n"
)


def tables(folder: Path) -> dict[str, bytes]:
    """Every file under a tables folder, by relative path."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def main(argv: list[str] | None = None) -> int:
    parser = harness.argument_parser(
        __doc__, repeats=3, repeats_help="tabulate runs of each engine"
    )
    args = parser.parse_args(argv)
    raw = harness.existing_raw(args.raw)
    if importlib.util.find_spec("ray") is None:
        raise SystemExit('needs the ray extra: pip install -e ".[ray]"')

    from ray.cluster_utils import Cluster

    harness.print_machine("PIL", "pyarrow", "ray")
    cores = os.cpu_count() or 1
    # a Ray head on this machine, as `ray start --head` makes it, for the joining runs
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": cores, "include_dashboard": False}
    )
    runs: dict[str, list[harness.Measurement]] = {name: [] for name in VARIANTS}
    try:
        with tempfile.TemporaryDirectory(prefix="imgpipe-ray-engine-") as folder:
            work = Path(folder)
            project = work / "project"
            log = work / "stages.log"
            harness.write_params(project, raw=raw, view=None, images=args.images)
            harness.run_split(project, log)
            split = project / "data" / "split"
            images = harness.count_files(split)
            params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
            print(
                f"{images:,} images, views {', '.join(params['views'])}; tabulate.workers "
                f"{params['tabulate']['workers']} (0: one per core), rows_per_group "
                f"{params['tabulate']['rows_per_group']}; {args.repeats} runs of each, in "
                "turn\n",
                flush=True,
            )
            outputs: dict[str, dict[str, bytes]] = {}
            names = list(VARIANTS)
            for round_number in range(args.repeats):
                shift = round_number % len(names)
                for name in names[shift:] + names[:shift]:  # each variant goes first in turn
                    engine, joins = VARIANTS[name]
                    harness.write_params(
                        project, raw=raw, view=None, images=args.images, tabulate__engine=engine
                    )
                    out = project / "data" / "tables"
                    shutil.rmtree(out, ignore_errors=True)
                    env = {"RAY_ADDRESS": cluster.address if joins else ""}
                    run = harness.run_tabulate(project, split, log, env=env)
                    runs[name].append(run)
                    print(
                        f"  round {round_number + 1}, {name:29}: {run.wall_s:5.1f} s, machine "
                        f"CPU {run.cpu_s + run.others_cpu_s:5.1f} s",
                        flush=True,
                    )
                    outputs[name] = tables(out)
            start_stop = harness.measure(
                [sys.executable, "-c", START_STOP], cwd=work, log=log, env={"RAY_ADDRESS": ""}
            )
    finally:
        cluster.shutdown()

    print()
    rows = []
    for name, measured in runs.items():
        walls = [r.wall_s for r in measured]
        median = statistics.median(walls)
        rows.append(
            [
                name,
                f"{min(walls):.1f}",
                f"{median:.1f}",
                f"{images * len(params['views']) / median:,.0f}",
                f"{statistics.median(r.cpu_s + r.others_cpu_s for r in measured):.1f}",
            ]
        )
    harness.print_table(["engine", "best s", "median s", "rows/s", "machine CPU s (median)"], rows)
    print(
        f"\nStarting a local Ray and stopping it, with no work (ray.init, Ray Data's first "
        f"dataset, ray.shutdown): {start_stop.wall_s:.1f} s"
    )
    medians = {name: statistics.median(r.wall_s for r in runs[name]) for name in VARIANTS}
    local = medians["local"]
    joined = medians["ray, joining a running Ray"]
    own = medians["ray, starting its own Ray"]
    print()
    identical = all(outputs[name] == outputs["local"] for name in VARIANTS)
    targets = harness.Targets()
    targets.check(
        "tables byte-identical across engines",
        identical,
        f"{len(outputs['local'])} files of each of {len(VARIANTS)} runs compared",
    )
    ratio = joined / local
    targets.check(
        "ray tabulate at most 2x the local engine's wall time (joining a running Ray)",
        ratio <= 2.0,
        f"{ratio:.2f}x ({joined:.1f} s against {local:.1f} s, medians)",
    )
    targets.info(
        f"ray starting its own Ray for the run: {own / local:.2f}x ({own:.1f} s; "
        f"{start_stop.wall_s:.1f} s of it is Ray's start and stop, measured alone)"
    )
    return targets.summary()


if __name__ == "__main__":
    sys.exit(main())
