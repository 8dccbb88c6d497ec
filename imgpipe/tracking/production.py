"""The served models in the MLflow registry: `<experiment>-<model>-production` holds copies of the
promoted versions, alias `champion` on the served one and `previous` on the one before; who may
change it is set once by the admin (set_up_production). imgpipe.promote decides, this module
reads runs and answers and moves the aliases.
"""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from imgpipe.runtime import StageError
from imgpipe.tracking.connection import redact
from imgpipe.tracking.runs import MODEL_ID_TAG, run_user

ANSWERS_ARTIFACT = "evaluation/answers.csv"  # evaluate's per-image test answers, one row each
CHAMPION, PREVIOUS = "champion", "previous"
MISSING = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


class PromotionError(StageError):
    """A promotion, rollback or set-up that cannot go ahead; the message says why and what to do."""


def production_name(experiment: str, model: str) -> str:
    """The registered model that holds the served versions of a model: imgpipe-cnn-production."""
    return f"{experiment}-{model}-production"


@dataclass(frozen=True)
class Candidate:
    """A training run that could be served: its id, model type, DVC experiment and answers."""

    run_id: str
    model: str
    experiment_name: str  # the DVC experiment, or "" for a workspace run
    answers: list[dict[str, str]]


class Production:
    """One MLflow store's registry, as seen by imgpipe-promote."""

    def __init__(self, uri: str, experiment: str, model: str) -> None:
        self.uri = uri
        self.where = redact(uri)  # for messages: no password
        self.experiment = experiment
        self.model = model
        self.name = production_name(experiment, model)
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    @property
    def on_server(self) -> bool:
        """True for an MLflow server (logins and permissions), False for a local store."""
        return self.uri.startswith(("http://", "https://"))

    def denied(self, error: mlflow.exceptions.MlflowException) -> PromotionError:
        """The message for a server that refuses this user the served model (it answers the
        same for a model that does not exist, so that names cannot be probed)."""
        return PromotionError(
            f"MLflow server {self.where} does not let user {run_user()!r} use {self.name} "
            f"({error.error_code}): only its maintainers may promote or roll back, the users the "
            f"admin named with `imgpipe-promote {self.model} --setup-production --maintainer "
            "NAME` (run with the admin's login; it also creates the model); ask one of them, or "
            "the admin"
        )

    def run_id_of_experiment(self, dvc_experiment: str) -> str:
        """The latest finished run of this model in a DVC experiment (`dvc exp show`'s name)."""
        found = self.client.get_experiment_by_name(self.experiment)
        query = f"tags.dvc_experiment = '{dvc_experiment}' and tags.model = '{self.model}'"
        runs = self.client.search_runs(
            [found.experiment_id] if found else [],
            query + " and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs:
            raise PromotionError(
                f"no finished {self.model} run of DVC experiment {dvc_experiment!r} in "
                f"experiment {self.experiment!r} of {self.where}: `dvc exp show` lists the "
                "experiments' names; the store must be the one they logged to"
            )
        return runs[0].info.run_id

    def candidate(self, run_id: str) -> Candidate:
        """The run with this id, checked to be a run of this model, with its answers."""
        try:
            run = self.client.get_run(run_id)
        except mlflow.exceptions.MlflowException as error:
            raise PromotionError(
                f"no run {run_id} in {self.where} ({error.error_code}): check the id (the MLflow "
                "UI's Run ID) and the store (MLFLOW_TRACKING_URI, else tracking.uri)"
            ) from None
        trained = run.data.tags.get("model")
        if trained != self.model:
            raise PromotionError(f"run {run_id} trained {trained!r}, not {self.model!r}")
        experiment_name = run.data.tags.get("dvc_experiment", "")
        return Candidate(run_id, self.model, experiment_name, self.answers(run_id))

    def answers(self, run_id: str) -> list[dict[str, str]]:
        """A run's per-image test answers (evaluate's `evaluation/answers.csv`)."""
        with tempfile.TemporaryDirectory() as folder:
            try:
                path = mlflow.artifacts.download_artifacts(
                    run_id=run_id,
                    artifact_path=ANSWERS_ARTIFACT,
                    dst_path=folder,
                    tracking_uri=self.uri,
                )
            except (mlflow.exceptions.MlflowException, OSError):
                raise PromotionError(
                    f"run {run_id} has no {ANSWERS_ARTIFACT}: evaluate logs it; rerun `dvc repro "
                    f"-f evaluate@{self.model}` in the run's workspace or experiment"
                ) from None
            text = Path(path).read_text(encoding="utf-8")
        return list(csv.DictReader(io.StringIO(text)))

    def alias(self, alias: str) -> ModelVersion | None:
        """The version of the production model holding `alias`, or None (no such model or
        alias yet)."""
        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except mlflow.exceptions.MlflowException as error:
            if error.error_code == "PERMISSION_DENIED":
                raise self.denied(error) from None
            if error.error_code in MISSING:
                return None
            raise

    def promote(self, candidate: Candidate, tags: Mapping[str, str]) -> ModelVersion:
        """Copy the candidate's logged model into the production model as a new version,
        tagged; `previous` moves to the old champion and `champion` to the new version."""
        run = self.client.get_run(candidate.run_id)
        model_id = run.data.tags.get(MODEL_ID_TAG)
        if model_id is None:
            raise PromotionError(
                f"run {candidate.run_id} logged no model: rerun `dvc repro -f "
                f"train@{self.model}` so that its run holds one"
            )
        old = self.alias(CHAMPION)
        try:
            self._ensure_model()
            version = self.client.create_model_version(
                self.name,
                f"models:/{model_id}",
                run_id=candidate.run_id,
                model_id=model_id,
                tags=dict(tags),
                description=self._description(run.data.tags),
            )
            if old is not None:
                self.client.set_registered_model_alias(self.name, PREVIOUS, old.version)
            self.client.set_registered_model_alias(self.name, CHAMPION, version.version)
        except mlflow.exceptions.MlflowException as error:
            if error.error_code == "PERMISSION_DENIED":
                raise self.denied(error) from None
            raise
        return version

    def rollback(self, tags: Mapping[str, str]) -> tuple[ModelVersion, ModelVersion]:
        """Swap `champion` and `previous` (a second rollback undoes the first); returns the
        (now served, now previous) versions."""
        champion, previous = self.alias(CHAMPION), self.alias(PREVIOUS)
        if champion is None or previous is None:
            raise PromotionError(
                f"{self.name} has no `{PREVIOUS}` version to roll back to (a rollback needs two "
                "promotions): promote a version with `imgpipe-promote --run RUN_ID --force`"
            )
        try:
            self.client.set_registered_model_alias(self.name, CHAMPION, previous.version)
            self.client.set_registered_model_alias(self.name, PREVIOUS, champion.version)
            for key, value in tags.items():
                self.client.set_model_version_tag(self.name, previous.version, key, value)
        except mlflow.exceptions.MlflowException as error:
            if error.error_code == "PERMISSION_DENIED":
                raise self.denied(error) from None
            raise
        return previous, champion

    def _ensure_model(self) -> None:
        """Create the production model on a local store; on a server, the admin must have."""
        try:
            self.client.get_registered_model(self.name)
            return
        except mlflow.exceptions.MlflowException as error:
            if error.error_code == "PERMISSION_DENIED":
                raise self.denied(error) from None
            if error.error_code not in MISSING:
                raise
        if self.on_server:  # made by a member, it would be theirs to change: the admin makes it
            raise PromotionError(
                f"{self.name} does not exist on {self.where}: the server's admin creates it, and "
                f"says who may change it, with `imgpipe-promote {self.model} --setup-production "
                "--maintainer NAME` (run with the admin's login)"
            )
        self.client.create_registered_model(self.name, tags={"imgpipe.model": self.model})

    def _description(self, run_tags: Mapping[str, str]) -> str | None:
        """The candidate's registered version's description (its model card's summary)."""
        registered = run_tags.get("registered_model", "")
        name, _, version = registered.rpartition("/")
        if not name:
            return None
        try:
            return self.client.get_model_version(name, version).description
        except mlflow.exceptions.MlflowException:
            return None


def set_up_production(
    uri: str, name: str, *, maintainers: Sequence[str], members: Sequence[str]
) -> list[str]:
    """As the server's admin: create the production model (so no member holds MANAGE on it),
    let each maintainer EDIT it and deny each listed member; returns what was done, by line."""
    from mlflow.server.auth.client import AuthServiceClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    done = []
    try:
        client.create_registered_model(name, tags={"imgpipe.maintainers": ",".join(maintainers)})
        done.append(f"created {name}")
    except mlflow.exceptions.MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise PromotionError(
                f"could not create {name} on {redact(uri)}: {error.message}"
            ) from None
        done.append(f"{name} exists")
    if not uri.startswith(("http://", "https://")):
        return [*done, "a local store has no logins: anyone who can write it may promote"]
    auth = AuthServiceClient(uri)
    for user, permission in [*((m, "EDIT") for m in maintainers), *((m, "DENY") for m in members)]:
        try:
            auth.grant_user_permission(user, "registered_model", name, permission)
        except mlflow.exceptions.MlflowException as error:
            raise PromotionError(
                f"could not grant {user!r} {permission} on {name}: {error.message} (run this "
                "with the admin's login in MLFLOW_TRACKING_USERNAME and _PASSWORD; each user "
                "must exist)"
            ) from None
        done.append(f"{user}: {permission} on {name}")
    return done
