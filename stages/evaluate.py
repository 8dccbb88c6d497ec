"""Stage `evaluate@<model>`: test metrics with 95 % intervals, plots, per-image answers and the
model card of one model, for DVC and its MLflow run."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from imgpipe.evaluation import EvaluateOutputs, evaluate_model
from imgpipe.params import load_params
from imgpipe.registry import model_types
from imgpipe.runtime import setup_logging, stage_errors


def main(argv: list[str] | None = None) -> None:
    """Evaluate the model named on the command line on the test table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=list(model_types()))
    parser.add_argument("--tables", required=True, type=Path, help="data/tables/<view>")
    parser.add_argument("--model-dir", required=True, type=Path, help="models/<model>")
    parser.add_argument("--metrics", required=True, type=Path, help="metrics/<model>.json")
    parser.add_argument("--plots", required=True, type=Path, help="plots/<model>/")
    parser.add_argument("--answers", required=True, type=Path, help="answers/<model>.csv")
    parser.add_argument("--card", required=True, type=Path, help="cards/<model>.md")
    args = parser.parse_args(argv)
    stage = f"evaluate@{args.model}"
    log = setup_logging(stage)
    started = time.perf_counter()
    test_table = args.tables / "test.parquet"
    with stage_errors(stage):
        params = load_params()
        outcome = evaluate_model(
            args.model,
            params,
            test_table=test_table,
            model_dir=args.model_dir,
            outputs=EvaluateOutputs(args.metrics, args.plots, args.answers, args.card),
        )
    metrics = outcome.metrics
    log.info(
        "%s on %d test images: accuracy %.4f [%.4f, %.4f], loss %.4f, f1 %.4f [%.4f, %.4f] "
        "(95 %% intervals)",
        args.model,
        outcome.n_test,
        metrics["accuracy"],
        *metrics["accuracy_ci95"],
        metrics["loss"],
        metrics["f1"],
        *metrics["f1_ci95"],
    )
    log.info(
        "read %s and %s; wrote %s, %d files to %s/, %s and %s; MLflow run %s %s; %.1f s",
        args.model_dir,
        test_table,
        args.metrics,
        len(outcome.plot_names),
        args.plots,
        args.answers,
        args.card,
        outcome.run_id,
        outcome.registered,
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    main()
