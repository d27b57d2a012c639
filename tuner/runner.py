"""What each command does, as library functions: spec -> data -> storage -> study -> trials -> report.

The CLI calls these and nothing else; tests call them too. Bad input is found before the database is touched:
the spec and the data are checked first, so a mistake writes nothing.
"""

from __future__ import annotations

import sys
import time

import click

from tuner import data as datasets
from tuner import spec as specs
from tuner import storage as storages
from tuner import transfer
from tuner.errors import SpecError


def default_study_name(spec: specs.StudySpec, base: specs.StudySpec) -> str:
    """The file's name, plus each design setting that differs from the file's."""
    parts = [spec.name]
    for key in ("epochs", "subset", "seed", "objective"):
        if getattr(spec, key) != getattr(base, key):
            parts.append(f"{key}{getattr(spec, key)}")
    if spec.data != base.data:
        parts.append("data-" + str(spec.data).rsplit("/", 1)[-1].removesuffix(".npz"))
    return "-".join(parts)


def prepare(
    study_file: str, *, kind: str, epochs=None, subset=None, seed=None, data=None, study_name=None, **overrides
):
    """Load and check the spec and the data; nothing touches the database yet."""
    base = specs.load(study_file)
    if base.kind != kind:
        hint = "tuner search" if base.kind == "search" else "tuner grid"
        raise SpecError(f"{study_file} is a {base.kind} study: run it with `{hint}`")
    spec = base.with_overrides(epochs=epochs, subset=subset, seed=seed, data=data, **overrides)
    splits = datasets.load(spec.data, subset=spec.subset, validation=spec.validation, seed=spec.seed)
    return spec, splits, study_name or default_study_name(spec, base)


def quiet_import_tensorflow() -> None:
    """Import TensorFlow and Keras with file descriptor 2 silenced: their C++ start-up lines ignore
    TF_CPP_MIN_LOG_LEVEL. Errors are still raised (and shown) once stderr is back."""
    import os

    if "keras" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import keras  # noqa: F401
        import optuna_integration.keras  # noqa: F401
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def run_study(
    study_file: str,
    *,
    kind: str,
    storage: str | None,
    heartbeat: int = 10,
    db_wait: float | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    from_studies: tuple[str, ...] = (),
    from_top: int = 5,
    artifacts_dir: str | None = None,
    **options,
) -> None:
    """Create or resume the study and work on it until it is complete (or, for a search, has its trials)."""
    spec, splits, name = prepare(study_file, kind=kind, **options)
    url = storages.resolve(storage)
    storage_obj = storages.open_storage(url, create=True, heartbeat_s=heartbeat, wait_s=db_wait)
    sources = [_load_tuner_study(storage_obj, source) for source in from_studies]  # checked before writing
    quiet_import_tensorflow()
    from tuner import artifacts
    from tuner import objective as objectives
    from tuner import study as studies_

    study = studies_.open_study(storage_obj, url, spec, name)
    display = _Display(spec, name, timeout)
    click.echo(f"study {name!r} in {storages.mask(url)}: {spec.description or spec.name}", err=True)
    if spec.kind == "grid":
        queued = studies_.seed_grid(study, spec, url)
        click.echo(f"{spec.n_cells} cells, {queued} queued now; data: {splits.describe()}", err=True)
        left, done = None, studies_.grid_done(spec)
    else:
        queued = transfer.enqueue_once(study, url, spec.enqueue)
        for source, source_spec in sources:
            copied, requeued, skipped = transfer.import_trials(study, url, spec, source, source_spec, top=from_top)
            click.echo(f"from {source.study_name!r}: {copied} trials copied, {requeued} configurations queued to "
                       f"be measured on validation, {skipped} outside the space", err=True)  # fmt: skip
        click.echo(f"search to {n_trials} trials (finished + running, this study in total); {queued} queued now; "
                   f"sampler {spec.sampler}, pruner {spec.pruner}; data: {splits.describe()}", err=True)  # fmt: skip
        left, done = studies_.search_budget(n_trials)
    objective = objectives.make_objective(spec, splits, on_epoch=display.epoch,
                                          artifact_store=artifacts.store(url, artifacts_dir))  # fmt: skip
    deadline = None if timeout is None else time.monotonic() + timeout
    studies_.run_trials(study, url, objective, new_trials_left=left, done=done, progress=display.progress(),
                        deadline=deadline)  # fmt: skip
    display.summary(study)


def _load_tuner_study(storage_obj, name: str):
    from tuner import study as studies_

    study, spec = studies_.load_study(storage_obj, name)
    if spec is None:
        raise SpecError(f"study {name!r} was not made by tuner: it has no stored study file")
    return study, spec


class _Display:
    """Progress at the terminal: one line per trial, epochs updating in place on a TTY."""

    def __init__(self, spec: specs.StudySpec, name: str, timeout: float | None = None) -> None:
        self.spec, self.name, self.tty, self.timeout = spec, name, sys.stderr.isatty(), timeout
        self.started = time.monotonic()
        self.counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
        self.best: float | None = None

    def progress(self):
        from tuner.study import Progress

        return Progress(on_trial_start=self.start, on_trial_end=self.end, on_wait=self.wait)

    def _params(self, params: dict) -> str:
        return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())

    def start(self, trial) -> None:
        self.trial_t0 = time.monotonic()

    def epoch(self, number: int, params: dict, epoch: int, epochs: int, logs: dict) -> None:
        # not the last-batch metric: under validation it is only the last validation batch's
        figures = " ".join(f"{k}={v:.4f}" for k, v in logs.items() if k in ("loss", "accuracy", "val_accuracy"))
        line = (
            f"trial {number} ({self._params(params)}): epoch {epoch}/{epochs} {figures} "
            f"[{time.monotonic() - self.trial_t0:.0f}s]"
        )
        click.echo(("\r\033[K" + line) if self.tty else line, err=True, nl=not self.tty)

    def end(self, frozen) -> None:
        state = frozen.state.name
        self.counts[state] = self.counts.get(state, 0) + 1
        values = frozen.values or []
        if len(values) == 1 and (self.best is None or values[0] > self.best):
            self.best = values[0]
        value = f" value={'/'.join(f'{v:.4f}' for v in values)}" if values else ""
        why = frozen.user_attrs.get("error", "")
        tally = ", ".join(f"{n} {k.lower()}" for k, n in self.counts.items() if n)
        best = "" if self.best is None else f", best {self.best:.4f}"
        if self.timeout is not None:
            best += f", {max(0.0, self.timeout - (time.monotonic() - self.started)) / 60:.1f} min left"
        if self.tty:
            click.echo("\r\033[K", err=True, nl=False)
        click.echo(
            f"{self._params(frozen.params) or 'trial'} -> trial {frozen.number} {state.lower()}{value}"
            f"{(': ' + why) if why else ''} [{time.monotonic() - self.trial_t0:.0f}s] ({tally}{best})",
            err=True,
        )

    def wait(self, running: int) -> None:
        if not getattr(self, "_waited", False):
            click.echo(f"waiting for {running} trial(s) running elsewhere...", err=True)
            self._waited = True

    def summary(self, study) -> None:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        by_state = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
        states = ", ".join(f"{n} {s}" for s, n in by_state.items() if n)
        click.echo(
            f"study {self.name!r}: {states}; this run {time.monotonic() - self.started:.0f}s. "
            f"Next: tuner report {self.name}",
            err=True,
        )


def report(names: list[str], *, fmt: str, figure: str | None, storage: str | None, plots: str | None = None) -> str:
    """The report text for one study, or for several runs of the same grid combined."""
    from tuner import report as reports
    from tuner import study as studies_

    url = storages.resolve(storage)
    storage_obj = storages.open_storage(url, create=False)
    loaded = [studies_.load_study(storage_obj, n) for n in names]
    first_spec = loaded[0][1]
    if first_spec is None:
        raise SpecError(f"study {names[0]!r} was not made by tuner: it has no stored study file")
    for study, spec in loaded[1:]:
        if spec is None or spec.kind != first_spec.kind or spec.grid != first_spec.grid:
            raise SpecError(
                f"study {study.study_name!r} has a different design from {names[0]!r}; "
                "only runs of the same grid can be combined"
            )
    if plots:
        from tuner import plots as plotting

        written = plotting.write(loaded[0][0], plots)
        click.echo(f"wrote {len(written)} plots to {plots}", err=True)
    if first_spec.kind != "grid":
        if len(loaded) > 1:
            raise SpecError("only grid studies can be combined in one report")
        return reports.render_search(first_spec, loaded[0][0], fmt=fmt)
    return reports.render(first_spec, [s for s, _ in loaded], fmt=fmt, figure=figure)


def studies(storage: str | None) -> str:
    from tuner import report as reports

    url = storages.resolve(storage)
    return reports.studies_table(storages.open_storage(url, create=False))


def _pick_trial(study, trial_number: int | None):
    """Trial `trial_number`, else the best (for two objectives: the Pareto trial with the best clean accuracy)."""
    from optuna.trial import TrialState

    if trial_number is not None:
        found = [t for t in study.get_trials(deepcopy=False) if t.number == trial_number]
        if not found:
            raise SpecError(f"study {study.study_name!r} has no trial {trial_number}")
        return found[0]
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise SpecError(f"study {study.study_name!r} has no complete trial yet")
    if len(study.directions) > 1:
        return max(study.best_trials, key=lambda t: t.values[0])
    return study.best_trial


def _trial_model(name: str, storage: str | None, artifacts_dir: str | None, trial_number: int | None):
    """The study, its spec, the chosen trial, its saved model and the data it was measured on."""
    url = storages.resolve(storage)
    study, spec = _load_tuner_study(storages.open_storage(url, create=False), name)
    trial = _pick_trial(study, trial_number)
    quiet_import_tensorflow()
    from tuner import artifacts

    model = artifacts.load_model(trial, artifacts.store(url, artifacts_dir, create=False))
    splits = datasets.load(spec.data, subset=spec.subset, validation=spec.validation, seed=spec.seed)
    return study, spec, trial, model, splits


def best(name: str, *, storage: str | None, artifacts_dir: str | None = None, trial: int | None = None) -> str:
    """The best trial, and its saved model loaded back and re-evaluated on the test set."""
    from tuner import models
    from tuner import report as reports

    study, _, chosen, model, splits = _trial_model(name, storage, artifacts_dir, trial)
    again = models.evaluate(model, splits.x_test, splits.y_test)
    return reports.best_text(study, chosen, again)


def _output_dir(out: str | None):
    from pathlib import Path

    if out is None:
        return None
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpecError(f"cannot create folder {path}: {exc.strerror}") from None
    return path


def confusions(name: str, *, storage: str | None, artifacts_dir: str | None = None, trial: int | None = None,
               top_k: int = 3, out: str | None = None) -> str:  # fmt: skip
    """The test-set confusion matrix of a saved model, its most-confused pairs, and the pairs confused
    consistently across the study's top-k saved models."""
    from optuna.trial import TrialState

    from tuner import adversarial, artifacts
    from tuner import report as reports

    folder = _output_dir(out)
    study, _, chosen, model, splits = _trial_model(name, storage, artifacts_dir, trial)
    matrix = adversarial.confusion_matrix(model, splits.x_test, splits.y_test)
    pairs = adversarial.most_confused(matrix, k=10)
    saved = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
             if t.user_attrs.get(artifacts.MODEL_ATTR)]  # fmt: skip
    saved.sort(key=lambda t: t.values[0], reverse=True)
    store = artifacts.store(storages.resolve(storage), artifacts_dir, create=False)
    matrices = [matrix if t.number == chosen.number else
                adversarial.confusion_matrix(artifacts.load_model(t, store), splits.x_test, splits.y_test)
                for t in saved[:top_k]]  # fmt: skip
    consistent = adversarial.consistent_pairs(matrices, k=5) if len(matrices) > 1 else []
    if folder is not None:
        adversarial.save_confusion_png(folder / "confusion.png", matrix, title=f"{name} trial {chosen.number}")
        preds = adversarial.predict(model, splits.x_test).argmax(axis=1)
        for true, predicted, _ in pairs[:3]:
            idx = [i for i in range(len(preds)) if splits.y_test[i] == true and preds[i] == predicted][:8]
            x = splits.x_test[idx]
            adversarial.save_grid_png(folder / f"confused_{true}_as_{predicted}.png", x, x, splits.y_test[idx],
                                      preds[idx], n=len(idx))  # fmt: skip
    return reports.confusions_text(name, chosen.number, matrix, pairs, consistent, [t.number for t in saved[:top_k]])


def attack(name: str, *, storage: str | None, artifacts_dir: str | None = None, trial: int | None = None,
           method: str, eps: float, target: str | None = None, n: int = 1000, steps: int = 20,
           out: str | None = None) -> str:  # fmt: skip
    """FGSM or PGD against a saved model on test images; targeted with `target` 'A:B' (images of A pushed to B)."""
    import json

    from tuner import adversarial

    if not 0.0 < eps <= 1.0:
        raise SpecError(f"--eps must be in (0, 1], got {eps}")
    source = goal = None
    if target is not None:
        try:
            source, goal = (int(v) for v in target.split(":"))
        except ValueError:
            raise SpecError(f"--target must look like 4:9 (source class:target class), got {target!r}") from None
        if not (0 <= source <= 9 and 0 <= goal <= 9) or source == goal:
            raise SpecError(f"--target classes must be two different digits 0..9, got {target!r}")
    folder = _output_dir(out)
    _, _, chosen, model, splits = _trial_model(name, storage, artifacts_dir, trial)
    x, y = splits.x_test, splits.y_test
    if source is not None:
        keep = y == source
        x, y = x[keep], y[keep]
    x, y = x[:n], y[:n]
    try:
        if method == "fgsm":
            adv = adversarial.fgsm(model, x, y, eps, target=goal)
        else:
            adv = adversarial.pgd(model, x, y, eps, steps=steps, target=goal)
        figures = adversarial.attack_report(model, x, y, adv, target=goal)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    figures.update({"study": name, "trial": chosen.number, "method": method, "eps": eps, "target": target})
    if folder is not None:
        clean = adversarial.predict(model, x).argmax(axis=1)
        fooled = adversarial.predict(model, adv).argmax(axis=1)
        stem = f"{method}_eps{eps}" + (f"_{source}to{goal}" if target else "")
        adversarial.save_grid_png(folder / f"{stem}.png", x, adv, clean, fooled, n=8)
        plain = {k: (float(v) if hasattr(v, "item") else v) for k, v in figures.items()}
        (folder / f"{stem}.json").write_text(json.dumps(plain, indent=2, default=float))
    return "\n".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in figures.items()) + "\n"


def export(name: str, *, fmt: str, storage: str | None) -> str:
    from tuner import report as reports

    url = storages.resolve(storage)
    study, _ = _load_tuner_study(storages.open_storage(url, create=False), name)
    return reports.export(study, fmt)


def dashboard(*, storage: str | None, host: str, port: int, artifacts_dir: str | None = None) -> None:
    """optuna-dashboard on the same storage (and artifact store), until Ctrl-C."""
    import optuna_dashboard

    from tuner import artifacts

    url = storages.resolve(storage)
    storage_obj = storages.open_storage(url, create=False)
    store = (
        artifacts.store(url, artifacts_dir, create=False) if artifacts.location(url, artifacts_dir).is_dir() else None
    )
    click.echo(f"optuna-dashboard for {storages.mask(url)} on http://{host}:{port} (Ctrl-C to stop)", err=True)
    optuna_dashboard.run_server(storage_obj, host=host, port=port, artifact_store=store)
