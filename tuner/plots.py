"""A study's plots through optuna.visualization: PNG (its matplotlib backend) and interactive HTML (plotly).

Parameter importances use Optuna's PED-ANOVA evaluator, which needs only numpy (fANOVA would need scikit-learn).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tuner.errors import TunerError


def _plots(study: optuna.Study) -> dict:
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as mpl

    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    done = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    multi = len(study.directions) > 1
    plots: dict = {}
    if multi:
        plots["pareto_front"] = (vis.plot_pareto_front, mpl.plot_pareto_front, {})
        return plots
    plots["history"] = (vis.plot_optimization_history, mpl.plot_optimization_history, {})
    if sum(t.state == TrialState.COMPLETE for t in done) >= 2 and study.get_trials(deepcopy=False)[0].params:
        plots["importances"] = (vis.plot_param_importances, mpl.plot_param_importances, {"evaluator": evaluator})
        plots["parallel_coordinates"] = (vis.plot_parallel_coordinate, mpl.plot_parallel_coordinate, {})
    if any(t.intermediate_values for t in done):
        plots["intermediate_values"] = (vis.plot_intermediate_values, mpl.plot_intermediate_values, {})
    return plots


def write(study: optuna.Study, folder: str) -> list[Path]:
    """Write each plot as NAME.png and NAME.html into `folder`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TunerError(f"cannot create plot folder {out}: {exc.strerror}") from None
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise TunerError(f"study {study.study_name!r} has no complete trial to plot")
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both backends are flagged experimental
        for name, (html_plot, png_plot, kwargs) in _plots(study).items():
            html_plot(study, **kwargs).write_html(out / f"{name}.html", include_plotlyjs="directory")
            ax = png_plot(study, **kwargs)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(10, 6)
            fig.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
            plt.close(fig)
            written += [out / f"{name}.html", out / f"{name}.png"]
    return written
