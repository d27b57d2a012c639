"""tuner search end to end on small subsets: pruning, divergence, resume, artifacts, export, --from, bad input."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import replace

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from tests.test_errors import assert_one_line_error

SPACE = """
[study]
kind = "search"
description = "tiny test search"

[training]
epochs = 4

[search.learning_rate]
choices = [0.003, 0.01, 4.0, 8.0]
reason = "two that learn, two hopeless"

[search.units]
choices = [8]

[pruner]
name = "successive-halving"
"""


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "space.toml"
    path.write_text(SPACE)
    return path


def study(db: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=db)


def test_search_prunes_hopeless_trials_and_selects_on_validation(run, space, db, tmp_path):
    args = ("search", "--study-file", space, "--trials", "10", "--subset", "600", "--storage", db,
            "--study-name", "s", "--artifacts", tmp_path / "art")  # fmt: skip
    result = run(*args)
    assert result.exit_code == 0, result.output
    trials = study(db, "s").trials
    assert len(trials) == 10
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned and complete
    assert all(t.user_attrs["epochs_run"] < 4 for t in pruned)
    assert all(len(t.intermediate_values) == t.user_attrs["epochs_run"] for t in trials)
    for t in complete:  # the value is the last epoch's validation accuracy, not the test accuracy
        assert t.value == pytest.approx(t.user_attrs["history"][-1]["val_accuracy"])
        assert t.user_attrs["n_val"] == 100 and t.user_attrs["monitor"] == "val_accuracy"
    hopeless = [t for t in trials if t.params["learning_rate"] >= 4.0]
    assert hopeless and sum(t.state == TrialState.PRUNED for t in hopeless) >= len(hopeless) / 2
    assert "pruned" in result.output and "best" in result.output

    # resume: the same command adds nothing; a larger budget adds exactly the difference
    assert run(*args).exit_code == 0
    assert len(study(db, "s").trials) == 10
    assert run(*[a if a != "10" else "12" for a in args]).exit_code == 0
    assert len(study(db, "s").trials) == 12

    # the best model is an artifact; reloaded, it scores the recorded test accuracy
    best = run("best", "s", "--storage", db, "--artifacts", tmp_path / "art")
    assert best.exit_code == 0, best.output
    assert "(the same model)" in best.output

    report = run("report", "s", "--storage", db, "--format", "json")
    summary = json.loads(report.output)
    assert summary["trials"]["pruned"] == sum(t.state == TrialState.PRUNED for t in study(db, "s").trials)
    assert summary["epochs_run"] < summary["epochs_if_unpruned"] == 12 * 4
    text = run("report", "s", "--storage", db, "--plots", tmp_path / "plots").output
    assert "never used to choose" in text
    for name in ("history", "importances", "intermediate_values", "parallel_coordinates"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 10_000
        assert "plotly" in (tmp_path / "plots" / f"{name}.html").read_text()


def test_export_formats(run, space, db, tmp_path):
    assert run("search", "--study-file", space, "--trials", "3", "--subset", "300", "--epochs", "1",
               "--storage", db, "--study-name", "e").exit_code == 0  # fmt: skip
    rows = json.loads(run("export", "e", "--storage", db, "--format", "json").output)
    assert [r["number"] for r in rows] == [0, 1, 2]
    assert {"state", "value", "params_learning_rate", "test_accuracy", "epochs_run", "worker"} <= set(rows[0])
    out = tmp_path / "e.csv"
    assert run("export", "e", "--storage", db, "--output", out).exit_code == 0
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(table) == 3 and float(table[0]["params_learning_rate"]) == rows[0]["params_learning_rate"]


def test_from_a_grid_queues_its_best_configurations(run, tiny_grid, db, tmp_path):
    assert (
        run("grid", tiny_grid, "--epochs", "1", "--subset", "300", "--storage", db, "--study-name", "g").exit_code == 0
    )
    space = tmp_path / "wide.toml"
    space.write_text(
        SPACE.replace("choices = [0.003, 0.01, 4.0, 8.0]", 'type = "float"\nlow = 0.0001\nhigh = 0.1\nlog = true')
        + "\n[search.batch_size]\nchoices = [32, 64]\n[search.cell]\nchoices = ['SimpleRNN']\n"
    )
    result = run("search", "--study-file", space, "--from", "g", "--from-top", "3", "--trials", "3", "--epochs", "1",
                 "--subset", "300", "--storage", db, "--study-name", "f")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3 configurations queued" in result.output
    grid_best = sorted(study(db, "g").trials, key=lambda t: t.value, reverse=True)[:3]
    searched = study(db, "f").trials
    assert sorted((t.params["learning_rate"], t.params["batch_size"]) for t in searched) == sorted(
        (t.params["learning_rate"], t.params["batch_size"]) for t in grid_best
    )


def test_from_a_study_measured_the_same_way_copies_trials(run, space, db):
    common = ("--study-file", space, "--epochs", "1", "--subset", "300", "--storage", db)
    assert run("search", *common, "--trials", "2", "--study-name", "a").exit_code == 0
    result = run("search", *common, "--trials", "3", "--study-name", "b", "--from", "a")
    assert "2 trials copied" in result.output
    b = study(db, "b").trials
    assert len(b) == 3 and sum("copied_from" in t.user_attrs for t in b) == 2


def test_timeout_stops_taking_trials(run, space, db):
    result = run("search", "--study-file", space, "--trials", "50", "--timeout", "1", "--epochs", "1",
                 "--subset", "300", "--storage", db, "--study-name", "t")  # fmt: skip
    assert result.exit_code == 0
    trials = study(db, "t").trials
    assert 1 <= len(trials) < 50 and all(t.state.is_finished() for t in trials)  # the last one ran to its end
    starts = [t.datetime_start for t in trials]
    assert (max(starts) - min(starts)).total_seconds() < 1.5  # none started once the 1 s budget was spent


def test_divergence_stops_the_trial_at_once():
    import keras

    from tuner import data, models

    splits = data.load(subset=300, validation=True)
    broken = replace(splits, x_train=np.full_like(splits.x_train, np.nan))
    model = models.build_model(models.ModelConfig(units=8), seed=0)
    calls = []  # calls of the train step: 300 images in batches of 8 are 38 steps, five calls of up to 8
    count = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: calls.append(batch))
    # 12 epochs: 456 steps, enough for several steps a call (models.LOOP_FROM_STEPS)
    result = models.train(model, broken, batch_size=8, epochs=12, seed=0, stop_on_divergence=True, callbacks=[count])
    assert result.diverged and len(result.epochs) == 1 and math.isnan(result.epochs[0].loss)
    assert calls == [models.STEPS_PER_EXECUTION - 1], "training ran on after the first call's NaN loss"
    assert result.test_accuracy is None


def test_training_leaves_no_traced_graph_alive():
    """Each trained model used to keep its train-step graphs alive through TensorFlow's gradient registry
    (tuner.models.forget_traced_gradients): no graph and no registry entry may outlive its trial."""
    import gc

    import keras
    from tensorflow.python.framework.func_graph import FuncGraph

    from tuner import data, models

    splits = data.load(subset=300, validation=True)
    registry = models._gradient_registry()
    assert registry is not None, "TensorFlow moved its gradient registry: tuner.models cannot clean it"

    def trial():
        model = models.build_model(models.ModelConfig(cell="LSTM", units=8), seed=0)
        models.train(model, splits, batch_size=64, epochs=1, seed=0)
        del model
        keras.backend.clear_session()
        gc.collect()
        return len(registry), sum(isinstance(o, FuncGraph) for o in gc.get_objects())

    first = trial()  # graphs of earlier tests in this process may still be alive: count growth, not totals
    assert trial() == first == trial()


def test_malloc_arenas_are_capped_unless_the_environment_says(monkeypatch):
    from tuner import models

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert models.limit_malloc_arenas() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert models.limit_malloc_arenas() is True  # glibc Linux: the machines tuner supports


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda s: s.replace("[search.units]\nchoices = [8]", ""), None),
        (lambda s: s.replace('choices = [0.003, 0.01, 4.0, 8.0]', "type = 'float'\nlow = 0.1\nhigh = 0.01"),
         "low (0.1) is greater than high (0.01)"),
        (lambda s: s.replace('choices = [0.003, 0.01, 4.0, 8.0]', "type = 'float'\nlow = 0.0\nhigh = 0.1\nlog = true"),
         "a log range must stay above 0"),
        (lambda s: s.split("[search.learning_rate]")[0], "a search study needs [search.*] tables"),
        (lambda s: s + "\n[[enqueue]]\nlearning_rate = 0.5\nunits = 8\n", "enqueue 1: learning_rate=0.5 is not among"),
    ],
)  # fmt: skip
def test_bad_search_spaces(run, tmp_path, edit, needle):
    path = tmp_path / "bad.toml"
    path.write_text(edit(SPACE))
    db = tmp_path / "never.db"
    result = run("search", "--study-file", path, "--trials", "1", "--epochs", "1", "--subset", "100",
                 "--storage", f"sqlite:///{db}")  # fmt: skip
    if needle is None:  # a valid smaller space: runs
        assert result.exit_code == 0
        return
    assert_one_line_error(result, needle)
    assert not db.exists()


def test_bad_search_options(run, space, db):
    assert run("search", "--sampler", "annealing", "--storage", db).exit_code == 2
    assert run("search", "--pruner", "random", "--storage", db).exit_code == 2
    result = run("search", "--study-file", space, "--sampler", "cmaes", "--trials", "1", "--storage", db)
    assert_one_line_error(result, "cmaes sampler needs a space without categorical parameters")
    result = run("search", "--study-file", space, "--from", "ghost", "--trials", "1", "--subset", "100",
                 "--storage", db, "--study-name", "never")  # fmt: skip
    assert_one_line_error(result, "no study named 'ghost'")
    with pytest.raises(KeyError):
        study(db, "never")
    assert_one_line_error(run("best", "ghost", "--storage", db), "no study named 'ghost'")


def test_pruning_steps_count_epochs_trained_so_the_first_rung_follows_the_first_epoch():
    from tuner.objective import _EpochPruning

    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    )
    good = study.ask()
    for epoch, accuracy in enumerate([0.8, 0.9, 0.95]):  # Keras numbers epochs from 0
        _EpochPruning(good, "val_accuracy").on_epoch_end(epoch, {"val_accuracy": accuracy})
    study.tell(good, 0.95)
    assert study.trials[0].intermediate_values == {1: 0.8, 2: 0.9, 3: 0.95}
    worse = study.ask()
    with pytest.raises(optuna.TrialPruned):  # compared at the rung of 1 epoch: after its first epoch, not second
        _EpochPruning(worse, "val_accuracy").on_epoch_end(0, {"val_accuracy": 0.3})


def test_a_trial_is_not_pruned_after_its_last_epoch():
    from tuner.objective import _EpochPruning

    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    )
    good = study.ask()
    good.report(0.9, step=1)
    good.should_prune()
    study.tell(good, 0.9)
    last = study.ask()
    callback = _EpochPruning(last, "val_accuracy")
    callback.set_params({"epochs": 1})
    callback.on_epoch_end(0, {"val_accuracy": 0.3})  # worse at the rung, but trained already: not pruned
    assert study.trials[1].intermediate_values == {1: 0.3}
    another = _EpochPruning(study.ask(), "val_accuracy")
    another.set_params({"epochs": 2})
    with pytest.raises(optuna.TrialPruned):  # the same at the rung with an epoch still to run
        another.on_epoch_end(0, {"val_accuracy": 0.3})


def test_the_default_search_pruner_compares_a_trial_after_its_first_epoch():
    from tuner.objective import _EpochPruning
    from tuner.spec import parse
    from tuner.study import make_pruner

    spec = parse({"study": {"kind": "search"}, "search": {"units": {"choices": [8]}}})
    study = optuna.create_study(direction="maximize", pruner=make_pruner(spec))
    assert isinstance(study.pruner, optuna.pruners.SuccessiveHalvingPruner)
    first = study.ask()
    _EpochPruning(first, "val_accuracy").on_epoch_end(0, {"val_accuracy": 0.9})
    worse = study.ask()
    with pytest.raises(optuna.TrialPruned):  # the first rung is one epoch trained
        _EpochPruning(worse, "val_accuracy").on_epoch_end(0, {"val_accuracy": 0.5})
