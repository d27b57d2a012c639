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
from tuner.errors import SpecError


def default_study_name(spec: specs.StudySpec, base: specs.StudySpec) -> str:
    """The file's name, plus each design setting that differs from the file's."""
    parts = [spec.name]
    for key in ("epochs", "subset", "seed"):
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


def run_study(study_file: str, *, kind: str, storage: str | None, heartbeat: int = 10, **options) -> None:
    """Create or resume the study and work on it until it is complete (or, for a search, has its trials)."""
    n_trials = options.pop("n_trials", None)
    spec, splits, name = prepare(study_file, kind=kind, **options)
    quiet_import_tensorflow()
    from tuner import objective as objectives
    from tuner import study as studies_

    url = storages.resolve(storage)
    storage_obj = storages.open_storage(url, create=True, heartbeat_s=heartbeat)
    study = studies_.open_study(storage_obj, url, spec, name)
    display = _Display(spec, name)
    click.echo(f"study {name!r} in {storages.mask(url)}: {spec.description or spec.name}", err=True)
    if spec.kind == "grid":
        queued = studies_.seed_grid(study, spec, url)
        click.echo(f"{spec.n_cells} cells, {queued} queued now; data: {splits.describe()}", err=True)
        left, done = None, studies_.grid_done(spec)
    else:
        left, done = studies_.search_budget(n_trials)
    objective = objectives.make_objective(spec, splits, on_epoch=display.epoch)
    studies_.run_trials(study, url, objective, new_trials_left=left, done=done, progress=display.progress())
    display.summary(study)


class _Display:
    """Progress at the terminal: one line per trial, epochs updating in place on a TTY."""

    def __init__(self, spec: specs.StudySpec, name: str) -> None:
        self.spec, self.name, self.tty = spec, name, sys.stderr.isatty()
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
        figures = " ".join(f"{k}={v:.4f}" for k, v in logs.items() if "acc" in k or k == "loss")
        line = (
            f"trial {number} ({self._params(params)}): epoch {epoch}/{epochs} {figures} "
            f"[{time.monotonic() - self.trial_t0:.0f}s]"
        )
        click.echo(("\r\033[K" + line) if self.tty else line, err=True, nl=not self.tty)

    def end(self, frozen) -> None:
        state = frozen.state.name
        self.counts[state] = self.counts.get(state, 0) + 1
        if frozen.value is not None and (self.best is None or frozen.value > self.best):
            self.best = frozen.value
        value = "" if frozen.value is None else f" value={frozen.value:.4f}"
        why = frozen.user_attrs.get("error", "")
        tally = ", ".join(f"{n} {k.lower()}" for k, n in self.counts.items() if n)
        best = "" if self.best is None else f", best {self.best:.4f}"
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


def report(names: list[str], *, fmt: str, figure: str | None, storage: str | None) -> str:
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
    if first_spec.kind != "grid":
        raise SpecError(f"study {names[0]!r} is a search: its report comes with `tuner search` (not yet built)")
    return reports.render(first_spec, [s for s, _ in loaded], fmt=fmt, figure=figure)


def studies(storage: str | None) -> str:
    from tuner import report as reports

    url = storages.resolve(storage)
    return reports.studies_table(storages.open_storage(url, create=False))
