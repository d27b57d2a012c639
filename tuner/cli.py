"""The `tuner` command. Each command is a few lines calling the library; errors become one line, no traceback.

tuner grid lr-batch --epochs 1 --subset 2000     # a quick run of the document's first grid
tuner report lr-batch                             # its tables beside the document's
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import warnings

import click

from tuner.errors import TunerError  # importing tuner sets TensorFlow's environment (tuner/__init__.py)


class TunerGroup(click.Group):
    """Turns library errors into `error: ...` on one line, and Ctrl-C into a clean exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TunerError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("\ninterrupted: the running trial was handed back; run the same command to resume", err=True)
            ctx.exit(130)


@click.group(cls=TunerGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="tuner", message="tuner %(version)s")
def cli() -> None:
    """Hyperparameter tuning for Keras recurrent networks on MNIST, on Optuna.

    Every study lives in a database: an embedded SQLite file tuner.db in the working directory by default,
    PostgreSQL or MySQL (--storage or TUNER_STORAGE) when many workers share one study.
    """


def storage_option(f):
    return click.option(
        "--storage",
        envvar="TUNER_STORAGE",
        metavar="URL",
        default=None,
        show_envvar=True,
        help="Database URL, e.g. sqlite:///tuner.db (the default), postgresql+psycopg://user@host/db or "
        "mysql+pymysql://user@host/db. A password can instead come from TUNER_DB_PASSWORD or the file named by "
        "TUNER_DB_PASSWORD_FILE; it is never printed.",
    )(f)


def run_options(f):
    options = [
        click.option(
            "--study-name",
            metavar="NAME",
            help="Study to create or resume. Default: the study file's "
            "name, plus any of epochs/subset/seed/data that differ from the file (e.g. "
            "lr-batch-epochs1-subset2000), so a quick run never mixes with a full one.",
        ),
        click.option("--epochs", type=click.IntRange(min=1), help="Epochs per trial (the document used 5)."),
        click.option(
            "--subset",
            type=click.IntRange(min=10),
            metavar="N",
            help="Train on N stratified training images (the test set stays whole): for quick runs.",
        ),
        click.option("--seed", type=int, help="Seed for weight init, shuffling and the sampler. Default: 0."),
        click.option(
            "--data",
            type=click.Path(dir_okay=False),
            metavar="PATH",
            help="An .npz with x_train, y_train, x_test, y_test (28x28 images, labels 0..9), e.g. "
            "Fashion-MNIST. Default: the MNIST bundled with tuner.",
        ),
        click.option(
            "--heartbeat",
            type=click.IntRange(min=1),
            default=10,
            show_default=True,
            metavar="SECONDS",
            help="Heartbeat interval. A trial silent for 3 intervals is taken as dead and re-run.",
        ),
        storage_option,
    ]
    return functools.reduce(lambda g, option: option(g), reversed(options), f)


def _sigterm_as_interrupt() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@cli.command()
@click.argument("study_file", metavar="GRID")
@run_options
def grid(study_file: str, **options) -> None:
    """Run one of the document's grids (or any grid study file) as an Optuna GridSampler study.

    GRID is a shipped grid (lr-batch, lr-units, lstm-optimizer, cell-type) or a path to a .toml study file.
    Running the same command again resumes: finished cells are not retrained. Start the same command on
    several machines against one database and they share the cells, each trained exactly once.
    """
    from tuner import runner

    _sigterm_as_interrupt()
    runner.run_study(study_file, kind="grid", **options)


def artifacts_option(f):
    return click.option(
        "--artifacts", "artifacts_dir", envvar="TUNER_ARTIFACTS", metavar="DIR", show_envvar=True,
        help="Where saved models go: an Optuna artifact store. Default: <database name>-artifacts/ beside a "
        "SQLite file, else ./tuner-artifacts (workers on several machines need a folder they all share).",
    )(f)  # fmt: skip


@cli.command()
@click.option(
    "--study-file",
    default="search",
    show_default=True,
    metavar="NAME|PATH",
    help="The search space: a shipped search study or a .toml file with [search.*] tables.",
)
@click.option(
    "--trials",
    "n_trials",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Trials the study should hold in total (complete + pruned, plus those running). Rerunning "
    "the same command continues up to this number; raise it to search further.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    metavar="SECONDS",
    help="Stop taking new trials after this long (the running trial finishes).",
)
@click.option(
    "--sampler",
    type=click.Choice(["tpe", "random", "gp", "cmaes"]),
    help="tpe (default, seeded), random, gp (Gaussian process) or cmaes (spaces without categorical parameters only).",
)
@click.option(
    "--pruner",
    type=click.Choice(["hyperband", "successive-halving", "median", "none"]),
    help="Stops hopeless trials on per-epoch validation accuracy. successive-halving (the default unless the study "
    "file names one): after epochs 1, 3 and 9, a trial outside the best third of the trials there stops. median: "
    "after any epoch, a trial below the median of the earlier trials at that epoch stops, once 5 have finished.",
)
@click.option(
    "--from",
    "from_studies",
    multiple=True,
    metavar="STUDY",
    help="Start from another study: its finished trials inside this space are copied when measured "
    "the same way (validation accuracy, same data and epochs), else their best configurations are "
    "queued to be measured here. Repeatable.",
)
@click.option(
    "--from-top",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="With --from, how many of a differently measured study's best configurations to queue.",
)
@click.option(
    "--objective",
    type=click.Choice(["accuracy", "robust"]),
    help="accuracy (default): validation accuracy. robust: two objectives, clean and FGSM validation accuracy at "
    "the study file's robust_eps (default 0.1); trials are not pruned.",
)
@artifacts_option
@run_options
def search(study_file: str, **options) -> None:
    """Search learning rate, batch size, units, cell, optimiser, layers and dropout, pruning bad trials.

    Trials are chosen on validation accuracy (the last 10,000 training images); test accuracy is recorded
    only to report. The models of the five best trials are saved as Optuna artifacts. Resumable and shareable like the
    grids: the same command on several machines against one database works on one study.
    """
    from tuner import runner

    _sigterm_as_interrupt()
    runner.run_study(study_file, kind="search", **options)


def trial_option(f):
    return click.option("--trial", type=int, metavar="N",
                        help="A trial other than the best (it must have a saved model).")(f)  # fmt: skip


@cli.command()
@click.argument("name", metavar="STUDY")
@trial_option
@artifacts_option
@storage_option
def best(name: str, trial: int | None, artifacts_dir: str | None, storage: str | None) -> None:
    """Show the best trial and load its saved model back to re-evaluate its test accuracy."""
    from tuner import runner

    click.echo(runner.best(name, storage=storage, artifacts_dir=artifacts_dir, trial=trial), nl=False)


@cli.command()
@click.argument("name", metavar="STUDY")
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Also compare the study's k best saved models: which pairs they all confuse.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Write confusion.png and example images of the most-confused pairs into DIR.",
)
@trial_option
@artifacts_option
@storage_option
def confusions(name: str, top_k: int, out: str | None, trial: int | None, artifacts_dir: str | None,
               storage: str | None) -> None:  # fmt: skip
    """Which digits a study's best model confuses: test-set confusion matrix and most-confused pairs."""
    from tuner import runner

    click.echo(runner.confusions(name, storage=storage, artifacts_dir=artifacts_dir, trial=trial, top_k=top_k,
                                 out=out), nl=False)  # fmt: skip


@cli.command()
@click.argument("name", metavar="STUDY")
@click.option(
    "--method",
    type=click.Choice(["fgsm", "pgd"]),
    default="fgsm",
    show_default=True,
    help="FGSM: one signed-gradient step; PGD: --steps projected steps (stronger).",
)
@click.option(
    "--eps",
    type=float,
    default=0.1,
    show_default=True,
    help="L-infinity size of the perturbation, in (0, 1] on pixels scaled to [0, 1].",
)
@click.option("--target", metavar="A:B", help="Targeted: push test images of digit A to be read as B.")
@click.option("-n", "n", type=click.IntRange(min=1), default=1000, show_default=True, help="Test images to attack.")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True, help="PGD steps.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Write a PNG of originals, perturbations and adversarial images, and the figures as JSON.",
)
@trial_option
@artifacts_option
@storage_option
def attack(name: str, method: str, eps: float, target: str | None, n: int, steps: int, out: str | None,
           trial: int | None, artifacts_dir: str | None, storage: str | None) -> None:  # fmt: skip
    """Adversarial examples against a study's best model: success rate, confidence, clean vs adversarial accuracy."""
    from tuner import runner

    click.echo(runner.attack(name, storage=storage, artifacts_dir=artifacts_dir, trial=trial, method=method,
                             eps=eps, target=target, n=n, steps=steps, out=out), nl=False)  # fmt: skip


@cli.command()
@click.argument("name", metavar="STUDY")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), help="Write to a file.")
@storage_option
def export(name: str, fmt: str, output: str | None, storage: str | None) -> None:
    """Export one row per trial: state, value, parameters, test accuracy, epochs, time, worker."""
    from tuner import runner

    _emit(runner.export(name, fmt=fmt, storage=storage), output)


@cli.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind. Keep 127.0.0.1 unless the dashboard must be reached from other machines.",
)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@artifacts_option
@storage_option
def dashboard(host: str, port: int, artifacts_dir: str | None, storage: str | None) -> None:
    """Serve optuna-dashboard on the same database, to follow studies in a browser."""
    from tuner import runner

    runner.dashboard(storage=storage, host=host, port=port, artifacts_dir=artifacts_dir)


def _emit(text: str, output: str | None) -> None:
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("n", type=click.IntRange(min=1))
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def workers(n: int, command: tuple[str, ...]) -> None:
    """Start N local worker processes running the same tuner command, e.g. `tuner workers 4 -- grid lr-batch`.

    Their output lines are prefixed [w1]..[wN]; Ctrl-C or SIGTERM is passed on to every worker (each hands its
    trial back); the exit status is the worst of theirs. Use a PostgreSQL or MySQL --storage, or the default
    SQLite file for one machine.
    """
    from tuner import workers as local

    sys.exit(local.run_workers(n, list(command)))


@cli.command()
@click.argument("names", nargs=-1, required=True, metavar="STUDY [STUDY...]")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "markdown", "csv", "json"]),
    default="table",
    show_default=True,
    help="table for the terminal, markdown to paste into a README, csv or json.",
)
@click.option(
    "--train",
    "figure",
    type=click.Choice(["last_batch", "mean"]),
    default=None,
    help="Train columns: accuracy on each epoch's last mini-batch (how the document measured its "
    "SimpleRNN tables) or the epoch mean (the sound figure). Default: the document's way.",
)
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), help="Write to a file.")
@click.option(
    "--plots",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Also write optimisation history, parameter importances, intermediate values and parallel "
    "coordinates (a Pareto front for two objectives) as PNG and HTML into DIR.",
)
@storage_option
def report(
    names: tuple[str, ...], fmt: str, figure: str | None, output: str | None, plots: str | None, storage: str | None
) -> None:
    """Rebuild a study's tables from the database, beside the document's numbers, with a verdict on each claim.

    For a grid: the document's tables, ours beside them, and its claims judged. Several studies of the same
    grid (for example one per seed) are combined: each cell shows the mean and the spread (max - min). For a
    search: trials by state, compute saved by pruning, the best trials against the document's best.
    """
    from tuner import runner

    _emit(runner.report(list(names), fmt=fmt, figure=figure, storage=storage, plots=plots), output)


@cli.command()
@storage_option
def studies(storage: str | None) -> None:
    """List the studies in the database: trials by state, best value, and the workers that ran them."""
    from tuner import runner

    click.echo(runner.studies(storage), nl=False)


def main() -> None:
    # Optuna flags heartbeats and the retry callback as experimental, and warns that heartbeats are meant for
    # study.optimize; tuner's own worker loop drives them (tuner.study), so these warnings are noise to users.
    warnings.filterwarnings("ignore", message=".*(experimental|Heartbeat of storage).*")
    # tuner's own notices (a database gone and back) print as plain lines on stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("tuner")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    cli(prog_name="tuner")


if __name__ == "__main__":
    sys.exit(main())
