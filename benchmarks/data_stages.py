"""Benchmarks of the data stages (split, tabulate) against the tutorial way, on real images.

Modes (docs/benchmarks.md shows their output):

  compare   split + tabulate vs the tutorial way (benchmarks/tutorial.py) on the same images:
            images/s, wall time, output size, peak memory, and the ratios
  scaling   tabulate's peak memory and speed at several image counts; counts beyond the real
            images are made of re-encoded flipped/cropped copies of them (synthetic JPEGs)
  epoch     one epoch of the dense model (no validation) fed as the train stage feeds it
            (imgpipe.training.training_data, then KerasModelType.epoch_input): from the Parquet
            table read whole, and streamed by row group, vs from the table already in memory;
            the target judges the way the stage takes for this table (train.stream_over_mb)
  repro     the whole pipeline under `dvc repro`, then a no-op `dvc repro` (dense model only,
            one epoch, to keep the first run short)
  all       every mode above in one run (compare also at 128x128 RGB on 5,000 images; epoch
            with at least 7 repeats), then every target, met or MISSED; exits with status 1 if
            one is missed

Every stage runs as its own process in a throw-away project under a temporary folder (outside
the repository), exactly as DVC runs it: `python -m stages.<stage>` with a params.yaml made from
the repository's one. Peak memory is the peak over time of the summed resident set size (RSS) of
the process and all its descendants (the worker processes), sampled every 20 ms: pages shared
between processes are counted once per process, so it is an upper bound. The largest single
process's peak (from the kernel's ru_maxrss) is printed beside it.

  python benchmarks/data_stages.py compare                      # 96x96 grayscale, all images
  python benchmarks/data_stages.py compare --size 128 --color rgb --images 5000
  python benchmarks/data_stages.py scaling --counts 5000 20000 100000
  python benchmarks/data_stages.py epoch
  python benchmarks/data_stages.py repro
  python benchmarks/data_stages.py all --repeats 3              # all of it: about 20 minutes
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # imgpipe, stages and benchmarks

from benchmarks import harness
from benchmarks.harness import MB, REPO, Measurement, Targets, View

if TYPE_CHECKING:
    from imgpipe.params import Params
    from imgpipe.registry import TrainingData

# --------------------------------------------------------------------------- steps


def run_tutorial(
    project: Path, split_dir: Path, view: View, log: Path, frame: str = "rows"
) -> Measurement:
    """The tutorial way (benchmarks/tutorial.py) on the same split folder."""
    command = [sys.executable, REPO / "benchmarks" / "tutorial.py", "--split", split_dir]
    command += ["--out", "data/tutorial", "--size", str(view.size), "--color", view.color]
    command += ["--frame", frame]
    return harness.measure(command, cwd=project, log=log)


def run_decode_only(project: Path, split_dir: Path, view: View, log: Path) -> Measurement:
    """The decoding alone, on all cores, with no output (benchmarks/decode_only.py)."""
    command = [sys.executable, REPO / "benchmarks" / "decode_only.py", "--split", split_dir]
    command += ["--size", str(view.size), "--color", view.color]
    return harness.measure(command, cwd=project, log=log, env=harness.stage_env())


def cost_row(name: str, images: int, run: Measurement, output_bytes: int) -> list[str]:
    """A row of COST_HEADERS."""
    return [
        name,
        f"{images:,}",
        f"{run.wall_s:.2f}",
        f"{images / run.wall_s:,.0f}",
        f"{run.cpu_s:.1f}",
        f"{run.others_cpu_s:.1f}",
        f"{output_bytes / MB:,.1f}",
        f"{run.peak_tree_rss / MB:,.0f}",
        f"{run.peak_single_rss / MB:,.0f}",
    ]


COST_HEADERS = (
    "step",
    "images",
    "wall s",
    "images/s",
    "CPU s",
    "other procs' CPU s",
    "output MB",
    "peak RSS MB (tree)",
    "peak RSS MB (1 process)",
)


# --------------------------------------------------------------------------- modes


def mode_compare(args: argparse.Namespace, work: Path, targets: Targets) -> None:
    """split + tabulate vs the tutorial way on the same images."""
    view = View(args.size, args.color)
    project = work / "project"
    log = work / "compare.log"
    harness.write_params(project, raw=args.raw, view=view, images=args.images)
    need = 4 * (args.images or 25_000) * view.size**2 * view.channels * 8  # floats, ~4 copies
    if need > 0.9 * psutil.virtual_memory().available and not args.force:
        raise SystemExit(
            f"the tutorial way would need about {need / 2**30:.0f} GiB of memory "
            f"({psutil.virtual_memory().available / 2**30:.0f} GiB free): pass a smaller --images"
        )
    harness.print_machine("PIL", "pyarrow")
    print(f"view {view.name} ({view.size}x{view.size} {view.color}); raw data {args.raw}")

    split_run = harness.median_run(lambda: harness.run_split(project, log), args.repeats)
    split_dir = project / "data" / "split"
    report = json.loads((project / "data" / "split-report.json").read_text())
    images = report["selected"]
    tables = project / "data" / "tables"
    tabulate_run = harness.median_run(
        lambda: harness.run_tabulate(project, split_dir, log), args.repeats
    )
    ceiling_run = harness.median_run(
        lambda: run_decode_only(project, split_dir, view, log), args.repeats
    )
    tutorial_out = project / "data" / "tutorial"
    kinder_run = run_tutorial(project, split_dir, view, log, frame="array")
    shutil.rmtree(tutorial_out)  # gigabytes of floats
    tutorial_run = run_tutorial(project, split_dir, view, log, frame="rows")
    table_bytes, pickle_bytes = (
        harness.tree_size(tables, "*.parquet"),
        harness.tree_size(tutorial_out, "*.pkl"),
    )
    shutil.rmtree(tutorial_out)

    print(
        f"\n{report['files_found']:,} files checked by split (decoded, hashed, duplicates "
        f"grouped: {report['duplicate_groups']} groups, {len(report['skipped'])} skipped); "
        f"{images:,} selected and tabulated; median of {args.repeats} run(s) for the stages\n"
    )
    rows = [
        cost_row("tutorial way (benchmarks/tutorial.py)", images, tutorial_run, pickle_bytes),
        cost_row("tutorial way, np.array before DataFrame", images, kinder_run, pickle_bytes),
        cost_row(
            "split stage (all files checked)",
            report["files_found"],
            split_run,
            harness.tree_size(split_dir),
        ),
        cost_row("tabulate stage", images, tabulate_run, table_bytes),
        cost_row("(decoding alone, all cores, no output)", images, ceiling_run, 0),
    ]
    harness.print_table(COST_HEADERS, rows)
    speedup = tutorial_run.wall_s / tabulate_run.wall_s
    both = tutorial_run.wall_s / (split_run.wall_s + tabulate_run.wall_s)
    size_ratio = pickle_bytes / table_bytes
    memory_ratio = tutorial_run.peak_tree_rss / tabulate_run.peak_tree_rss
    print(
        f"\nratios, tutorial way / tabulate: time {speedup:.1f}x, output size {size_ratio:.1f}x, "
        f"peak RSS {memory_ratio:.1f}x; tutorial way / (split + tabulate): time {both:.1f}x; "
        f"np.array variant / tabulate: time {kinder_run.wall_s / tabulate_run.wall_s:.1f}x"
    )
    print(
        f"tabulate runs at {ceiling_run.wall_s / tabulate_run.wall_s:.0%} of the speed of "
        "decoding alone (decode_image, the same tasks, nothing written) measured in this run"
    )
    if view != View(96, "grayscale"):
        print("\nthe targets are stated for 96x96 grayscale: none checked for this view")
        return
    print("\ntargets (stated for 20,000 images, 96x96 grayscale):")
    rate = images / tabulate_run.wall_s
    targets.check("tabulate >= 5,000 images/s", rate >= 5000, f"{rate:,.0f} images/s")
    targets.check("tabulate >= 8x the tutorial way", speedup >= 8, f"{speedup:.1f}x")
    targets.check("table <= 1/8 of the pickle", size_ratio >= 8, f"1/{size_ratio:.1f}")
    targets.check(
        "tabulate peak RSS < 1 GB",
        tabulate_run.peak_tree_rss < 1e9,
        f"{tabulate_run.peak_tree_rss / MB:,.0f} MB (whole process tree)",
    )
    targets.check("split < 15 s", split_run.wall_s < 15, f"{split_run.wall_s:.1f} s")


def make_synthetic(split_dir: Path, out: Path, count: int) -> int:
    """Fill out/<split>/<class>/ with `count` JPEGs: the real ones, then variants of them."""
    originals = sorted(p.relative_to(split_dir) for p in split_dir.rglob("*") if p.is_file())
    jobs = [
        (split_dir / relative, out / relative, variant)
        for variant in range(-(-count // len(originals)))
        for relative in originals
    ][:count]
    with multiprocessing.Pool() as pool:
        return sum(pool.imap_unordered(_write_variant, jobs, chunksize=64))


def _write_variant(job: tuple[Path, Path, int]) -> int:
    """Variant 0 is the file itself; the others are flipped and/or cropped and re-encoded."""
    from PIL import Image, ImageOps

    source, destination, variant = job
    destination = destination.with_name(f"{destination.stem}.v{variant}{destination.suffix}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    if variant:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            width, height = image.size
            if variant % 2:
                image = ImageOps.mirror(image)
            if variant % 4 >= 2:
                image = ImageOps.flip(image)
            if variant >= 4:  # a crop whose offset depends on the variant, resized back
                margin = 1 + variant % 7
                box = (margin, 2 * margin, width - 2 * margin, height - margin)
                image = image.resize((width, height), box=box)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=85)
            data = buffer.getvalue()
    destination.write_bytes(data)
    return len(data)


def mode_scaling(args: argparse.Namespace, work: Path, targets: Targets) -> None:
    """tabulate at several image counts: peak memory must stay flat."""
    view = View(args.size, args.color)
    log = work / "scaling.log"
    harness.print_machine("PIL", "pyarrow")
    print(f"view {view.name}; tabulate's cost as the image count grows\n")
    full = work / "full"
    harness.write_params(full, raw=args.raw, view=view, images=None)
    harness.run_split(full, log)
    real = harness.count_files(full / "data" / "split")
    rows = []
    for count in args.counts:
        project = work / f"n{count}"
        if count <= real:
            harness.write_params(project, raw=args.raw, view=view, images=count)
            harness.run_split(project, log)
            split_dir, kind = project / "data" / "split", "real"
        else:
            harness.write_params(project, raw=args.raw, view=view, images=None)
            split_dir, kind = work / f"synthetic-{count}", "synthetic"
            started = time.perf_counter()
            written = make_synthetic(full / "data" / "split", split_dir, count)
            print(
                f"made {count:,} synthetic JPEGs ({written / MB:,.0f} MB) in {split_dir} "
                f"in {time.perf_counter() - started:.0f} s"
            )
        images = harness.count_files(split_dir)
        run = harness.median_run(
            lambda p=project, s=split_dir: harness.run_tabulate(p, s, log), args.repeats
        )
        tables = harness.tree_size(project / "data" / "tables", "*.parquet")
        rows.append(cost_row(f"tabulate, {kind} images", images, run, tables))
        shutil.rmtree(project / "data" / "tables")
        if kind == "synthetic":
            shutil.rmtree(split_dir)
    print()
    harness.print_table(COST_HEADERS, rows)
    peaks = [float(r[7].replace(",", "")) for r in rows]
    growth = max(peaks) / peaks[0]
    first, last = rows[0][1], rows[-1][1]
    counts = [int(r[1].replace(",", "")) for r in rows]
    per_image = (peaks[-1] - peaks[0]) * MB / max(counts[-1] - counts[0], 1)
    pixels = view.size**2 * view.channels
    print(
        f"\npeak RSS (tree) from {first} to {last} images: x{peaks[-1] / peaks[0]:.2f}, "
        f"{per_image:,.0f} bytes more per added image, against {pixels:,} bytes of pixels "
        "per image"
    )
    print("\ntargets:")
    targets.check(
        "tabulate peak RSS < 1 GB at every count", max(peaks) < 1000, f"{max(peaks):,.0f} MB"
    )
    targets.check(
        "tabulate peak RSS flat as the image count grows (at most +25%)",
        growth <= 1.25,
        f"x{growth:.2f} from {first} images to the highest peak",
    )


EPOCH_FEEDS = {  # the epoch mode's feeds: how its table of results names each
    "memory": "table already in memory (baseline)",
    "read": "Parquet table read whole each epoch, as the train stage reads it",
    "stream": "Parquet row groups streamed, as the train stage streams a table",
}


def epoch_fits(tables: Path, params: Params) -> dict[str, Callable[[], None]]:
    """For each of EPOCH_FEEDS, a function that trains a dense model of its own for one epoch
    (no validation), its input made by the train stage's code: imgpipe.training.training_data,
    then KerasModelType.epoch_input (the epoch's order gathered and batched by
    in_memory_batches, or the stream's shuffle buffer)."""
    from imgpipe.registry import model_type

    dense, seed = params.dense, params.train.seed
    entry = model_type("dense")
    in_memory = stage_data(tables, params, streamed=False)  # read before any epoch: the baseline
    models = {
        name: harness.fresh_model("dense", dense, in_memory, seed=seed) for name in EPOCH_FEEDS
    }
    epochs_run = dict.fromkeys(EPOCH_FEEDS, 0)

    def fit(name: str) -> None:
        data = in_memory if name == "memory" else stage_data(tables, params, name == "stream")
        y_train = entry.targets(dense, data.y_train, data.num_classes)  # (0,) when streamed
        fed = entry.epoch_input(
            dense, data, (y_train, data.y_val), seed=seed, epoch=epochs_run[name]
        )
        epochs_run[name] += 1
        fed = {key: value for key, value in fed.items() if not key.startswith("validation")}
        models[name].fit(**fed, epochs=1, verbose=0)

    return {name: functools.partial(fit, name) for name in EPOCH_FEEDS}


def stage_data(tables: Path, params: Params, streamed: bool) -> TrainingData:
    """The train table as the train stage holds it: read whole, or streamed by row group; the
    val table as a stream, which reads nothing until iterated (validation is not timed)."""
    from imgpipe.training import training_data

    return training_data(
        tables / "train.parquet",
        tables / "val.parquet",
        streamed={"train": streamed, "val": True},
        shuffle_rows=params.train.shuffle_rows,
    )


def mode_epoch(args: argparse.Namespace, work: Path, targets: Targets) -> None:
    """One dense-model epoch fed as the train stage feeds it, from Parquet, vs from memory."""
    view = View(args.size, args.color)
    project = work / "project"
    tables = harness.tabulated_project(
        project, work / "epoch.log", raw=args.raw, view=view, images=args.images
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from imgpipe.params import load_params
    from imgpipe.tables import table_info
    from imgpipe.training import pixel_megabytes

    params = load_params(project / "params.yaml")
    dense, bound = params.dense, params.train.stream_over_mb
    stage_feed = "stream" if pixel_megabytes(tables / "train.parquet") > bound else "read"
    fits = epoch_fits(tables, params)
    n = table_info(tables / "train.parquet")[3]
    harness.print_machine("PIL", "pyarrow")
    print(
        f"dense model {dense.hidden_units}, batch {dense.batch_size}, one epoch over "
        f"{n:,} {view.name} training images, fed by KerasModelType.epoch_input; warm-up epoch "
        f"each, then {args.repeats} timed epoch(s) each, interleaved; keras {keras.__version__}\n"
    )
    for fit in fits.values():  # warm-up: tracing, first allocations
        fit()
    times: dict[str, list[float]] = {name: [] for name in fits}
    others = dict.fromkeys(fits, 0.0)
    for _ in range(args.repeats):
        for name, fit in fits.items():
            seconds, elsewhere = harness.timed(fit)
            times[name].append(seconds)
            others[name] += elsewhere
    harness.print_table(
        (
            "fed from",
            "epoch s (median)",
            "images/s",
            "best epoch s",
            "each epoch s",
            "other procs' CPU s",
        ),
        [
            [
                EPOCH_FEEDS[name],
                f"{statistics.median(times[name]):.2f}",
                f"{n / statistics.median(times[name]):,.0f}",
                f"{min(times[name]):.2f}",
                " ".join(f"{t:.2f}" for t in times[name]),
                f"{others[name]:.1f}",
            ]
            for name in fits
        ],
    )
    base_median, base_best = statistics.median(times["memory"]), min(times["memory"])
    print()
    for name in ("read", "stream"):
        slower = statistics.median(times[name]) / base_median - 1
        best = min(times[name]) / base_best - 1
        print(f"{EPOCH_FEEDS[name]} vs in-memory: {slower:+.1%} time (median), {best:+.1%} (best)")
    reading, _ = harness.timed(lambda: stage_data(tables, params, streamed=False))
    print(
        f"reading the whole training table: {reading:.2f} s ({reading / base_best:.1%} of an epoch)"
    )
    way = "streams this table" if stage_feed == "stream" else "reads this table whole"
    print(f"the train stage {way} (train.stream_over_mb {bound:,}): the target judges that way")
    # Best epochs, as timeit compares: on this 2-vCPU machine an epoch of any feed takes either
    # about 11 or about 21 s, at random, which swamps medians of a few epochs; the fastest epoch
    # of each feed is the one no outside slowdown hit.
    stage_slower = min(times[stage_feed]) / base_best - 1
    targets.check(
        "an epoch fed from Parquet (the train stage's path) within 5% of one from memory",
        stage_slower <= 0.05,
        f"{stage_slower:+.1%} (best epochs; reading the table alone is {reading / base_best:.1%})",
    )


def mode_repro(args: argparse.Namespace, work: Path, targets: Targets) -> None:
    """A fresh DVC project: full `dvc repro`, then no-op `dvc repro` runs."""
    view = View(args.size, args.color)
    project = work / "dvcproject"
    log = work / "repro.log"
    project.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy2(REPO / name, project / name)
    for name in ("stages", "imgpipe", "weights"):  # weights/: the `weights` stage's dep
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    (project / "data" / "raw").mkdir(parents=True)
    (project / "data" / "raw" / args.raw.name).symlink_to(args.raw.resolve())
    harness.write_params(
        project,
        raw=Path("data/raw") / args.raw.name,
        view=view,
        images=args.images,
        dense__epochs=1,
    )
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["models"] = {"dense": view.name}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        # the stages' `python` must be this interpreter, also when its venv is not activated
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    dvc = [str(Path(sys.executable).with_name("dvc"))]
    harness.measure([*dvc, "init", "--no-scm", "-q"], cwd=project, log=log, env=env)
    harness.print_machine("PIL", "pyarrow")
    first = harness.measure([*dvc, "repro"], cwd=project, log=log, env=env)
    images = harness.count_files(project / "data" / "split")
    print(f"dvc repro of a fresh project, {images:,} images in data/split, dense model only\n")
    rows = [["first `dvc repro` (runs every stage)", f"{first.wall_s:.1f}"]]
    noop = []
    for attempt in range(1, args.repeats + 2):
        run = harness.measure([*dvc, "repro"], cwd=project, log=log, env=env)
        noop.append(run.wall_s)
        rows.append([f"no-op `dvc repro` #{attempt}", f"{run.wall_s:.2f}"])
    last_line = log.read_text().rstrip().splitlines()[-1]
    status = harness.measure([*dvc, "status"], cwd=project, log=log, env=env)
    rows.append(["`dvc status`", f"{status.wall_s:.2f}"])
    harness.print_table(("command", "wall s"), rows)
    print(f"\nthe no-op runs said: {last_line}")
    targets.check("no-op dvc repro < 5 s", max(noop) < 5, f"{max(noop):.2f} s (slowest)")


def mode_all(args: argparse.Namespace, work: Path, targets: Targets) -> None:
    """Every mode, each in its own work folder; then every target checked."""
    started = time.perf_counter()
    runs = [
        ("compare", mode_compare, {}),
        ("compare", mode_compare, {"size": 128, "color": "rgb", "images": 5000}),
        ("scaling", mode_scaling, {}),
        # an epoch here takes either about 8 or about 10.5 s, whatever feeds it: best-of-7
        ("epoch", mode_epoch, {"repeats": max(args.repeats, 7)}),
        ("repro", mode_repro, {}),
    ]
    for number, (name, mode, overrides) in enumerate(runs, 1):
        mode_args = argparse.Namespace(**{**vars(args), **overrides})
        options = " ".join(f"--{key} {value}" for key, value in overrides.items())
        print(f"\n{'=' * 20} {number}/{len(runs)}: {name} {options}".rstrip(), flush=True)
        folder = work / f"{number}-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        mode(mode_args, folder, targets)
        if args.work is None:  # a gigabyte or two of splits and tables each
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\n{'=' * 20} every target ({time.perf_counter() - started:.0f} s in all)")
    status = targets.summary(repeat=True)
    if status:
        raise SystemExit(status)


def main(argv: list[str] | None = None) -> None:
    """Parse the mode and options, run the benchmark in a temporary folder."""
    parser = harness.argument_parser(__doc__, repeats=1, repeats_help="runs of each timed step")
    parser.add_argument("mode", choices=("compare", "scaling", "epoch", "repro", "all"))
    parser.add_argument("--size", type=int, default=96, help="image height and width")
    parser.add_argument("--color", choices=("grayscale", "rgb"), default="grayscale")
    parser.add_argument(
        "--counts",
        type=int,
        nargs="+",
        default=[5000, 20000, 100000],
        help="scaling: image counts (beyond the real ones: synthetic)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="work folder (default: a new temporary folder, deleted afterwards)",
    )
    parser.add_argument("--force", action="store_true", help="skip the memory check")
    args = parser.parse_args(argv)
    args.raw = harness.existing_raw(args.raw)
    work = args.work or Path(tempfile.mkdtemp(prefix="imgpipe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        {
            "compare": mode_compare,
            "scaling": mode_scaling,
            "epoch": mode_epoch,
            "repro": mode_repro,
            "all": mode_all,
        }[args.mode](args, work, Targets())
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"\nwork folder kept: {work}")


if __name__ == "__main__":
    main()
