"""The imgpipe-promote command: serve a trained model only when it beats the one served now on the
same test images (McNemar's exact test on the two models' per-image right/wrong answers), or move
it anyway with --force; roll back; and, for the admin, set up who may promote.

The served versions are copies in the registered model `<experiment>-<model>-production`, alias
`champion` (and `previous` for the one before): `imgpipe-serve
models:/imgpipe-<model>-production@champion` serves whatever holds it.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from imgpipe.metrics import wilson_interval
from imgpipe.runtime import StageError, stage_errors

if TYPE_CHECKING:
    from imgpipe.tracking.production import Production


def mcnemar_exact(candidate_only: int, champion_only: int) -> float:
    """McNemar's exact two-sided p-value: the discordant pairs as a binomial with p = 1/2."""
    n = candidate_only + champion_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(candidate_only, champion_only) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integers; one float division at the end


@dataclass(frozen=True)
class Comparison:
    """Two models' answers on the same n test images, and McNemar's exact test on them."""

    n: int
    candidate_right: int
    champion_right: int
    candidate_only: int  # images the candidate gets right and the champion wrong
    champion_only: int  # the other way round
    p_value: float
    alpha: float

    @property
    def better(self) -> bool:
        """The candidate is right more often, significantly at level alpha."""
        return self.candidate_only > self.champion_only and self.p_value < self.alpha

    def line(self, champion_version: str) -> str:
        """One line: both accuracies with 95 % Wilson intervals, the counts, the p-value."""

        def accuracy(right: int) -> str:
            low, high = wilson_interval(right, self.n)
            return f"{right / self.n:.4f} [{low:.4f}, {high:.4f}]"

        if self.p_value >= self.alpha:
            verdict = "no significant difference"
        else:
            verdict = f"the {'candidate' if self.better else 'champion'} is better"
        return (
            f"on {self.n} test images: candidate accuracy {accuracy(self.candidate_right)}, "
            f"champion (version {champion_version}) {accuracy(self.champion_right)} (95 % Wilson "
            f"intervals); right only by the candidate {self.candidate_only}, only by the "
            f"champion {self.champion_only}; McNemar's exact p = {self.p_value:.4g}, alpha "
            f"{self.alpha:g}: {verdict}"
        )


def _keyed(answers: Sequence[Mapping[str, str]], who: str) -> dict[str, Mapping[str, str]]:
    """Answers by source; duplicate sources are refused."""
    keyed = {row["source"]: row for row in answers}
    if len(keyed) != len(answers):
        raise StageError(f"the {who}'s answers name some test images twice")
    return keyed


def compare_answers(
    candidate: Sequence[Mapping[str, str]], champion: Sequence[Mapping[str, str]], alpha: float
) -> Comparison:
    """Pair the two models' answers image by image; refused unless both answered exactly the
    same test images with the same labels."""
    ours, theirs = _keyed(candidate, "candidate"), _keyed(champion, "champion")
    if not ours:
        raise StageError("the candidate's answers are empty: rerun its evaluate stage")
    if ours.keys() != theirs.keys():
        only_ours, only_theirs = (
            sorted(ours.keys() - theirs.keys()),
            sorted(theirs.keys() - ours.keys()),
        )
        example = (only_ours or only_theirs)[0]
        raise StageError(
            f"the candidate and the champion were tested on different images ({len(ours)} and "
            f"{len(theirs)}; {len(only_ours)} only the candidate's, {len(only_theirs)} only the "
            f"champion's, e.g. {example}): a paired comparison needs the same test set. Train "
            "the candidate on the champion's split (same data.raw and split params), or promote "
            "it with --force --reason '...'"
        )
    relabelled = [s for s in ours if ours[s]["label"] != theirs[s]["label"]]
    if relabelled:
        raise StageError(f"the two runs disagree on the true label of {relabelled[0]}")
    right = {s: (ours[s]["correct"] == "1", theirs[s]["correct"] == "1") for s in ours}
    candidate_only = sum(mine and not other for mine, other in right.values())
    champion_only = sum(other and not mine for mine, other in right.values())
    return Comparison(
        n=len(right),
        candidate_right=sum(mine for mine, _ in right.values()),
        champion_right=sum(other for _, other in right.values()),
        candidate_only=candidate_only,
        champion_only=champion_only,
        p_value=mcnemar_exact(candidate_only, champion_only),
        alpha=alpha,
    )


def _parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="imgpipe-promote", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the model type, e.g. cnn")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run", help="the candidate's MLflow run id")
    which.add_argument("--exp", help="the candidate's DVC experiment (as `dvc exp show` names it)")
    which.add_argument("--rollback", action="store_true", help="swap champion and previous")
    which.add_argument(
        "--setup-production", action="store_true", help="as the admin: create the model"
    )
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (0.05)")
    parser.add_argument("--force", action="store_true", help="promote even if not better")
    parser.add_argument("--reason", default="", help="why: recorded on the version")
    parser.add_argument("--maintainer", action="append", default=[], help="may promote (setup)")
    parser.add_argument("--member", action="append", default=[], help="denied (setup)")
    return parser


def _stamp(action: str, reason: str) -> dict[str, str]:
    """Who did what when, and why: the version tags every change records."""
    from imgpipe.tracking.runs import run_user

    return {
        f"imgpipe.{action}_by": run_user(),
        f"imgpipe.{action}_at": datetime.now(UTC).isoformat(timespec="seconds"),
        f"imgpipe.{action}_reason": reason,
    }


def _candidate_run_id(production: Production, args: argparse.Namespace) -> str:
    """--run, else the latest run of --exp, else the workspace's models/<model>/mlflow_run.json."""
    from imgpipe.model_folder import ModelFolder

    if args.run:
        return args.run
    if args.exp:
        return production.run_id_of_experiment(args.exp)
    folder = ModelFolder(Path("models") / args.model)
    if not folder.run_file.exists():
        raise StageError(
            f"no {folder.run_file} here: run `dvc repro` in the project, or name the candidate "
            "with --run RUN_ID or --exp EXPERIMENT"
        )
    return folder.run_id()


def promote(production: Production, args: argparse.Namespace) -> int:
    """Promote the candidate when it beats the champion (or when forced, or when there is no
    champion yet); print what happened and return the exit status (1: refused)."""
    candidate = production.candidate(_candidate_run_id(production, args))
    champion = production.alias("champion")
    if champion is not None and champion.run_id == candidate.run_id:
        print(
            f"run {candidate.run_id} is already the champion ({production.name} version "
            f"{champion.version}): nothing to do"
        )
        return 0
    if champion is None:
        decision, comparison = "first champion", "no champion before"
    else:
        found = compare_answers(candidate.answers, production.answers(champion.run_id), args.alpha)
        comparison = found.line(champion.version)
        if not (found.better or args.force):
            print(
                f"refused: the candidate (run {candidate.run_id}) is not better {comparison}; "
                f"{production.name}@champion stays version {champion.version} (--force "
                "--reason '...' promotes it anyway)"
            )
            return 1
        decision = "better" if found.better else "forced (not better)"
    reason = args.reason or decision
    tags = {
        **_stamp("promoted", reason),
        "imgpipe.decision": decision,
        "imgpipe.comparison": comparison,
        "imgpipe.source_run": candidate.run_id,
    }
    if candidate.experiment_name:
        tags["imgpipe.dvc_experiment"] = candidate.experiment_name
    version = production.promote(candidate, tags)
    before = f"; previous: version {champion.version}" if champion is not None else ""
    print(
        f"promoted run {candidate.run_id} to {production.name} version {version.version}, "
        f"alias champion ({decision}; {comparison}){before}"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    """Everything after parsing: the store from params.yaml, then the one action asked for."""
    from imgpipe.params import load_params
    from imgpipe.tracking.connection import configure_mlflow, login_problem, tracking_uri
    from imgpipe.tracking.production import Production, production_name, set_up_production

    tracking = load_params().tracking
    configure_mlflow()
    uri = tracking_uri(tracking.uri)
    if problem := login_problem(uri):
        raise StageError(f"{problem}; nothing was changed")
    if args.force and not args.reason:
        raise StageError("--force needs --reason '...': it is recorded on the version")
    if args.setup_production:
        name = production_name(tracking.experiment, args.model)
        done = set_up_production(uri, name, maintainers=args.maintainer, members=args.member)
        print("\n".join(done))
        return 0
    production = Production(uri, tracking.experiment, args.model)
    if args.rollback:
        served, previous = production.rollback(_stamp("rolled_back", args.reason or "rollback"))
        print(
            f"rolled back {production.name}: champion is version {served.version} again, "
            f"previous is version {previous.version}"
        )
        return 0
    return promote(production, args)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, act, exit 0 (done), 1 (refused, with why) or 2 (bad usage)."""
    args = _parser().parse_args(argv)
    with stage_errors("imgpipe-promote"):
        code = _run(args)
    sys.exit(code)


if __name__ == "__main__":
    main()
