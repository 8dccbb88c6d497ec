"""Stage `train@<model>`: fit one model on its view's tables; save it, its history and run id."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from imgpipe.params import load_params
from imgpipe.registry import model_types
from imgpipe.runtime import setup_logging, stage_errors
from imgpipe.training import train_model


def main(argv: list[str] | None = None) -> None:
    """Train the model named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=list(model_types()))
    parser.add_argument("--tables", required=True, type=Path, help="data/tables/<view>")
    parser.add_argument("--out", required=True, type=Path, help="output folder (models/<model>)")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="per-epoch checkpoint folder (checkpoints/<model>), kept outside the DVC output so "
        "that an interrupted run resumes; removed once the model is saved",
    )
    args = parser.parse_args(argv)
    stage = f"train@{args.model}"
    log = setup_logging(stage)
    started = time.perf_counter()
    with stage_errors(stage):
        params = load_params()
        outcome = train_model(
            args.model,
            params,
            tables_dir=args.tables,
            out_dir=args.out,
            checkpoint_dir=args.checkpoint,
        )
    result, folder = outcome.result, outcome.folder
    log.info(
        "%d epoch(s) in %.1f s (%.0f images/s), %s parameters; saved to %s",
        len(result.history.get("loss", [])),
        result.seconds,
        result.images_per_second,
        f"{result.parameters:,}",
        args.out,
    )
    log.info(
        "read %s and %s; wrote %s/ (%s, %s, %s, %s); MLflow run %s; %.1f s",
        *outcome.inputs,
        args.out,
        outcome.weights_file,
        folder.meta_path.name,
        folder.history_csv.name,
        folder.run_file.name,
        outcome.run_id,
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    main()
