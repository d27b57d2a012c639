"""tuner confusions / attack / --objective robust through the CLI, on a tiny search with saved models."""

from __future__ import annotations

import json

import optuna
import pytest

from tests.test_errors import assert_one_line_error

SPACE = """
[study]
kind = "search"
[training]
epochs = 2
[search.learning_rate]
choices = [0.003, 0.01]
[search.units]
choices = [16]
[search.adv_share]
choices = [0.0, 0.5]
"""


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    from click.testing import CliRunner

    from tuner.cli import cli

    folder = tmp_path_factory.mktemp("phase2")
    space = folder / "space.toml"
    space.write_text(SPACE)
    db = f"sqlite:///{folder / 'p.db'}"
    result = CliRunner().invoke(cli, ["search", "--study-file", str(space), "--trials", "3", "--subset", "1200",
                                      "--storage", db, "--study-name", "p", "--pruner", "none"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return db, folder


def test_confusions_of_the_best_model(run, searched, tmp_path):
    db, _ = searched
    result = run("confusions", "p", "--storage", db, "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="p", storage=db)
    right = round(study.best_trial.user_attrs["test_accuracy"] * 10000)
    assert f"{right}/10000 test images right" in result.output
    assert "most confused pairs" in result.output and " -> " in result.output
    assert (tmp_path / "c" / "confusion.png").stat().st_size > 5000


def test_attack_lowers_accuracy_and_writes_figures(run, searched, tmp_path):
    db, _ = searched
    result = run("attack", "p", "--storage", db, "--method", "fgsm", "--eps", "0.2", "-n", "300", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "fgsm_eps0.2.json").read_text())
    assert figures["adversarial_accuracy"] < figures["clean_accuracy"]
    assert figures["max_perturbation"] <= 0.2 + 1e-6
    assert list(tmp_path.glob("fgsm_eps0.2*.png"))
    targeted = run("attack", "p", "--storage", db, "--method", "pgd", "--eps", "0.3", "--target", "4:9", "-n", "100")
    assert targeted.exit_code == 0 and "targeted: True" in targeted.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--eps", "0"), "--eps must be in (0, 1]"),
        (("--eps", "1.5"), "--eps must be in (0, 1]"),
        (("--target", "4:12"), "two different digits 0..9"),
        (("--target", "four:nine"), "--target must look like 4:9"),
        (("--trial", "99"), "has no trial 99"),
    ],
)
def test_attack_bad_input(run, searched, args, needle):
    db, _ = searched
    assert_one_line_error(run("attack", "p", "--storage", db, *args), needle)


def test_a_trial_without_a_saved_model(run, searched):
    db, _ = searched
    study = optuna.load_study(study_name="p", storage=db)
    model_less = study.trials[0]  # a finished trial recorded without its model, as a copied trial is
    study.add_trial(optuna.trial.create_trial(params=model_less.params, distributions=model_less.distributions,
                                              value=0.0))  # fmt: skip
    number = len(study.trials) - 1
    assert_one_line_error(run("confusions", "p", "--storage", db, "--trial", str(number)), "has no saved model")
    assert_one_line_error(run("attack", "p", "--storage", db, "--trial", str(number)), "has no saved model")


def test_robust_objective_is_two_objectives(run, tmp_path):
    space = tmp_path / "r.toml"
    space.write_text(SPACE)
    db = f"sqlite:///{tmp_path / 'r.db'}"
    result = run("search", "--study-file", space, "--objective", "robust", "--trials", "2", "--epochs", "1",
                 "--subset", "600", "--storage", db, "--study-name", "robust")  # fmt: skip
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="robust", storage=db)
    assert len(study.directions) == 2
    for t in study.trials:
        assert t.values[1] == pytest.approx(t.user_attrs["robust_val_accuracy"]) and t.values[1] <= 1
    best = run("best", "robust", "--storage", db)
    assert best.exit_code == 0 and "(the same model)" in best.output, best.output
    report = run("report", "robust", "--storage", db, "--plots", tmp_path / "plots")
    assert report.exit_code == 0 and "Pareto front" in report.output
    assert (tmp_path / "plots" / "pareto_front.png").is_file()
