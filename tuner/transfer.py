"""Starting a search from what is already known: the study file's queued configurations, and other studies.

`--from STUDY` copies a finished trial when it was measured the way this search measures (validation accuracy
on the same data and epochs): its compute is not spent twice. A trial measured otherwise (the document's grids
report test accuracy, with no validation split) cannot be compared with this search's values without choosing
on the test set, so its configuration is queued instead, best first, to be measured on validation.
"""

from __future__ import annotations

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from sqlalchemy.engine import URL

from tuner import storage as storages
from tuner.spec import StudySpec, outside


def distributions(spec: StudySpec) -> dict[str, BaseDistribution]:
    """The search space as Optuna distributions (the same ones `objective.suggest` samples)."""
    out: dict[str, BaseDistribution] = {}
    for p in spec.space:
        if p.type == "categorical":
            out[p.name] = CategoricalDistribution(list(p.choices))
        elif p.type == "int":
            out[p.name] = IntDistribution(int(p.low), int(p.high), log=p.log)
        else:
            out[p.name] = FloatDistribution(p.low, p.high, log=p.log)
    return out


def _lock(study: optuna.Study, url: URL):
    return storages.study_lock(url, f"tuner:claim:{study.study_name}")


def enqueue_once(study: optuna.Study, url: URL, points: tuple[dict, ...]) -> int:
    """Queue each configuration unless the study already has it (in any state). Returns how many were queued."""
    with _lock(study, url):
        before = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        for params in points:
            study.enqueue_trial(dict(params), skip_if_exists=True)
        return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))) - before


def _same_protocol(a: StudySpec, b: StudySpec) -> bool:
    return a.validation and b.validation and (a.data, a.subset, a.epochs) == (b.data, b.subset, b.epochs)


def source_params(trial: optuna.trial.FrozenTrial, spec: StudySpec) -> dict:
    """A source trial's configuration in this space's terms: its recorded model settings, then its params."""
    model = dict(trial.user_attrs.get("model", {}))
    merged = {**model, **trial.params}
    return {p.name: merged.get(p.name) for p in spec.space}


def import_trials(study: optuna.Study, url: URL, spec: StudySpec, source: optuna.Study, source_spec: StudySpec,
                  *, top: int = 5) -> tuple[int, int, int]:  # fmt: skip
    """Copy (same protocol) or queue (otherwise, the `top` best) the finished trials of `source` that fall in
    this space. Returns (copied, queued, outside the space). Running it twice adds nothing twice."""
    finished = sorted(source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                      key=lambda t: t.value, reverse=True)  # fmt: skip
    inside = [(t, source_params(t, spec)) for t in finished]
    skipped = sum(outside(spec, params) is not None for _, params in inside)
    inside = [(t, params) for t, params in inside if outside(spec, params) is None]
    dists = distributions(spec)
    copied = queued = 0
    with _lock(study, url):
        have = {t.user_attrs.get("copied_from") for t in study.get_trials(deepcopy=False)}
        if _same_protocol(spec, source_spec):
            for t, params in inside:
                tag = f"{source.study_name}#{t.number}"
                if tag in have:
                    continue
                study.add_trial(optuna.trial.create_trial(
                    params=params, distributions=dists, value=t.value,
                    intermediate_values=t.intermediate_values, user_attrs={**t.user_attrs, "copied_from": tag},
                ))  # fmt: skip
                copied += 1
        else:
            waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
            for _, params in inside[:top]:
                study.enqueue_trial(params, skip_if_exists=True)
            queued = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))) - waiting
    return copied, queued, skipped
