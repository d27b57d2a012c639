"""Where saved models live: an Optuna artifact store, a folder beside the database unless told otherwise.

The best model of a study so far is saved in Keras format and uploaded with `optuna.artifacts.upload_artifact`,
so the dashboard lists it with its trial; `load_model` brings it back to re-evaluate it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from sqlalchemy.engine import URL

from tuner import storage as storages
from tuner.errors import TunerError

MODEL_ATTR = "model_artifact"


def location(url: URL, override: str | None = None) -> Path:
    """`--artifacts` / TUNER_ARTIFACTS, else `<db name>-artifacts/` beside a SQLite file, else ./tuner-artifacts.

    Workers on several machines need a folder they all see (a shared mount), as the database is shared.
    """
    chosen = override or os.environ.get("TUNER_ARTIFACTS")
    if chosen:
        return Path(chosen)
    db = storages.sqlite_path(url)
    if db is not None:
        return db.with_name(db.stem + "-artifacts")
    return Path("tuner-artifacts")


def store(url: URL, override: str | None = None, *, create: bool = True) -> FileSystemArtifactStore:
    path = location(url, override)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


def save_model(trial: optuna.Trial, model, artifact_store) -> str:
    """Save `model` as this trial's artifact; its id goes into the trial's user attributes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"trial-{trial.number}.keras")
        model.save(path)
        artifact_id = upload_artifact(artifact_store=artifact_store, file_path=path, study_or_trial=trial,
                                      mimetype="application/octet-stream")  # fmt: skip
    trial.set_user_attr(MODEL_ATTR, artifact_id)
    return artifact_id


def load_model(trial: optuna.trial.FrozenTrial, artifact_store):
    """The Keras model saved for `trial`."""
    import keras

    from tuner import metrics, recurrent  # noqa: F401  registers tuner's layers and metric, which saved models name

    artifact_id = trial.user_attrs.get(MODEL_ATTR)
    if artifact_id is None:
        raise TunerError(
            f"trial {trial.number} has no saved model (a study keeps the models of its five best trials so far)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        try:
            download_artifact(artifact_store=artifact_store, file_path=path, artifact_id=artifact_id)
        except Exception as exc:  # the store raises its own not-found types
            raise TunerError(f"the saved model of trial {trial.number} is missing from the artifact store: "
                             f"{exc.__class__.__name__}") from None  # fmt: skip
        return keras.models.load_model(path)
