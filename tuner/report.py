"""Tables and verdicts rebuilt from the database alone: our numbers beside the document's.

A report reads the spec stored with each study (which grid it ran, the document's tables and claims) and the
trials' user attributes (per-epoch figures, test accuracy, times). Several studies of the same design (say,
the same grid under three seeds) are combined: each cell then shows the mean, and the spread is reported.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field

from optuna.trial import TrialState

from tuner.spec import Claim, StudySpec, cell_key

FORMATS = ("table", "markdown", "csv", "json")


@dataclass
class Cell:
    """One grid cell: its parameters and, per seed, what the trial measured."""

    params: dict
    test: list[float] = field(default_factory=list)
    train_last: list[list[float]] = field(default_factory=list)
    train_mean: list[list[float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)

    def train(self, figure: str) -> list[float]:
        runs = self.train_last if figure == "last_batch" else self.train_mean
        return [statistics.fmean(col) for col in zip(*runs)] if runs else []

    @property
    def mean_test(self) -> float:
        return statistics.fmean(self.test)

    @property
    def spread(self) -> float:
        return max(self.test) - min(self.test) if len(self.test) > 1 else 0.0


def collect(spec: StudySpec, studies: list) -> list[Cell]:
    """The complete trials of `studies` (all of `spec`'s design), one Cell per grid cell, in grid order."""
    names = list(spec.grid)
    cells = {cell_key(params, names): Cell(params) for params in spec.cells()}
    for study in studies:
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            cell = cells.get(cell_key(t.params, names))
            attrs = t.user_attrs
            if cell is None or attrs.get("test_accuracy") is None:
                continue
            history = attrs.get("history", [])
            cell.test.append(float(attrs["test_accuracy"]))
            cell.train_last.append([e["last_batch_accuracy"] for e in history])
            cell.train_mean.append([e["accuracy"] for e in history])
            cell.seconds.append(float(attrs.get("fit_seconds", math.nan)))
            cell.workers.append(attrs.get("worker", "?"))
    return list(cells.values())


# ---------------------------------------------------------------- verdicts: pure functions of the cells


@dataclass
class Verdict:
    quote: str
    verdict: str  # holds | does not hold | not enough data
    because: str


def _matching(cells: list[Cell], where: dict) -> list[Cell]:
    return [c for c in cells if c.test and all(_same(c.params.get(k), v) for k, v in where.items())]


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _label(cell: Cell, skip: tuple = ()) -> str:
    return ", ".join(f"{_short(k)}={v}" for k, v in cell.params.items() if k not in skip)


def _short(name: str) -> str:
    return {"learning_rate": "lr", "batch_size": "batch", "optimizer": "opt"}.get(name, name)


def judge(claim: Claim, cells: list[Cell], figure: str) -> Verdict:
    """A verdict on one claim, with the numbers behind it."""
    check = _CHECKS[claim.check]
    return Verdict(claim.quote, *check(claim, cells, figure))


def _chance_level(claim: Claim, cells: list[Cell], figure: str) -> tuple[str, str]:
    hits = _matching(cells, claim.where)
    if not hits:
        return "not enough data", "no finished cell matches"
    limit = claim.threshold if claim.threshold is not None else 0.2
    low = [c for c in hits if c.mean_test < limit]
    detail = "; ".join(f"{_label(c, tuple(claim.where))}: {c.mean_test:.3f}" for c in hits)
    verdict = "holds" if len(low) == len(hits) else "does not hold"
    return verdict, f"{len(low)} of {len(hits)} cells end below {limit} test accuracy ({detail})"


def _converges(claim: Claim, cells: list[Cell], figure: str) -> tuple[str, str]:
    hits = _matching(cells, claim.where)
    if not hits:
        return "not enough data", "no finished cell matches"
    limit = claim.threshold if claim.threshold is not None else 0.9
    good = [c for c in hits if c.mean_test >= limit and c.train("mean")[-1] > c.train("mean")[0]]
    detail = "; ".join(
        f"{_label(c, tuple(claim.where))}: train {c.train('mean')[0]:.3f}->{c.train('mean')[-1]:.3f}, "
        f"test {c.mean_test:.3f}"
        for c in hits
    )
    verdict = "holds" if len(good) == len(hits) else "does not hold"
    return verdict, f"{len(good)} of {len(hits)} cells rise and reach {limit} test accuracy ({detail})"


def _flat(claim: Claim, cells: list[Cell], figure: str) -> tuple[str, str]:
    hits = _matching(cells, claim.where)
    if not hits:
        return "not enough data", "no finished cell matches"
    limit = claim.threshold if claim.threshold is not None else 0.05
    moves = [(c, c.train("mean")[-1] - c.train("mean")[0]) for c in hits]
    flat = [c for c, d in moves if abs(d) < limit]
    detail = "; ".join(f"{_label(c, tuple(claim.where))}: {d:+.3f}" for c, d in moves)
    verdict = "holds" if len(flat) == len(hits) else "does not hold"
    return verdict, f"epoch-mean train accuracy moves less than {limit} in {len(flat)} of {len(hits)} cells ({detail})"


def _separates(claim: Claim, cells: list[Cell], figure: str) -> tuple[str, str]:
    done = [c for c in cells if c.test]
    low = [c for c in done if c.params[claim.param] <= claim.a]
    high = [c for c in done if c.params[claim.param] > claim.a]
    if not low or not high:
        return "not enough data", "needs finished cells on both sides"
    worst_low = min(low, key=lambda c: c.mean_test)
    best_high = max(high, key=lambda c: c.mean_test)
    margin = worst_low.mean_test - best_high.mean_test
    need = claim.threshold or 0.0
    verdict = "holds" if margin > need else "does not hold"
    return verdict, (
        f"worst {_short(claim.param)} <= {claim.a}: {worst_low.mean_test:.3f} ({_label(worst_low)}); "
        f"best above: {best_high.mean_test:.3f} ({_label(best_high)}); margin {margin:+.3f} (needs > {need})"
    )


def _pairs(claim: Claim, cells: list[Cell]) -> list[tuple[Cell, Cell]]:
    done = [c for c in cells if c.test]
    pairs = []
    for x in done:
        if not _same(x.params[claim.param], claim.a):
            continue
        for y in done:
            if _same(y.params[claim.param], claim.b) and all(
                _same(x.params[k], y.params[k]) for k in x.params if k != claim.param
            ):
                pairs.append((x, y))
    return pairs


def _gain(claim: Claim, cells: list[Cell], figure: str) -> tuple[str, str]:
    pairs = _pairs(claim, cells)
    if not pairs:
        return "not enough data", f"no finished pair of cells with {claim.param}={claim.a} and {claim.b}"
    gains = [y.mean_test - x.mean_test for x, y in pairs]
    detail = "; ".join(
        f"{_label(x, (claim.param,)) or 'all'}: {x.mean_test:.3f} -> {y.mean_test:.3f}" for x, y in pairs
    )
    mean_gain = statistics.fmean(gains)
    need = claim.threshold or 0.0
    verdict = "holds" if mean_gain > need or (need > 0 and mean_gain >= need) else "does not hold"
    return verdict, f"{claim.param} {claim.a} -> {claim.b}: mean test gain {mean_gain:+.4f} (needs > {need}); {detail}"


def _best_gain(claim: Claim, cells: list[Cell], figure: str) -> tuple[str, str]:
    """Each value of `param` at its best setting of the other parameters: does b beat a?"""
    best = {}
    for value in (claim.a, claim.b):
        tried = [c for c in cells if c.test and _same(c.params[claim.param], value)]
        if not tried:
            return "not enough data", f"no finished cell with {claim.param}={value}"
        best[value] = max(tried, key=lambda c: c.mean_test)
    gain = best[claim.b].mean_test - best[claim.a].mean_test
    need = claim.threshold or 0.0
    verdict = "holds" if gain > need else "does not hold"
    return verdict, (
        f"best at {claim.param}={claim.a}: {best[claim.a].mean_test:.3f} ({_label(best[claim.a])}); "
        f"at {claim.b}: {best[claim.b].mean_test:.3f} ({_label(best[claim.b])}); gain {gain:+.4f} (needs > {need})"
    )


def _not_worth(claim: Claim, cells: list[Cell], figure: str) -> tuple[str, str]:
    pairs = [(x, y) for x, y in _pairs(claim, cells) if x.mean_test > 0.5 or y.mean_test > 0.5]
    if not pairs:
        return "not enough data", f"no pair of trained (test > 0.5) cells with {claim.param}={claim.a} and {claim.b}"
    gain = statistics.fmean(y.mean_test - x.mean_test for x, y in pairs)
    ratio = statistics.fmean(statistics.fmean(y.seconds) / statistics.fmean(x.seconds) for x, y in pairs)
    limit = claim.threshold if claim.threshold is not None else 0.005
    verdict = "holds" if gain < limit and ratio > 1.0 else "does not hold"
    return verdict, (
        f"{claim.param} {claim.a} -> {claim.b} over {len(pairs)} learning rates that train: mean test gain "
        f"{gain:+.4f} (worth it from {limit}), training time x{ratio:.2f}"
    )


def _best(claim: Claim, cells: list[Cell], figure: str) -> tuple[str, str]:
    done = [c for c in cells if c.test]
    hits = _matching(cells, claim.where)
    if not hits:
        return "not enough data", "the named cell has not finished"
    ranked = sorted(done, key=lambda c: statistics.fmean(c.train(figure)), reverse=True)
    top = ranked[0]
    rank = ranked.index(hits[0]) + 1
    verdict = "holds" if top is hits[0] else "does not hold"
    return verdict, (
        f"its mean train accuracy ({figure.replace('_', '-')}) {statistics.fmean(hits[0].train(figure)):.3f} "
        f"ranks {rank} of {len(done)}; highest: {_label(top)} at {statistics.fmean(top.train(figure)):.3f}"
    )


_CHECKS = {
    "chance_level": _chance_level,
    "converges": _converges,
    "flat": _flat,
    "separates": _separates,
    "gain": _gain,
    "best_gain": _best_gain,
    "not_worth": _not_worth,
    "best": _best,
}


# ---------------------------------------------------------------- layout


@dataclass
class Row:
    table: str
    row: object
    source: str  # ours | document
    train: list[float]
    test: float | None
    spread: float | None = None
    seconds: float | None = None


def build_rows(spec: StudySpec, cells: list[Cell], figure: str) -> list[Row]:
    """Our rows and the document's, table by table, in the document's shape (rows x Train 1..N, Test)."""
    row_key = spec.report.get("rows", next(iter(spec.grid)))
    table_key = spec.report.get("tables")
    rows: list[Row] = []
    for cell in cells:
        title = f"{table_key} = {cell.params[table_key]}" if table_key else "all"
        if cell.test:
            rows.append(
                Row(
                    title,
                    cell.params[row_key],
                    "ours",
                    cell.train(figure),
                    cell.mean_test,
                    cell.spread if len(cell.test) > 1 else None,
                    statistics.fmean(cell.seconds),
                )
            )
        else:
            rows.append(Row(title, cell.params[row_key], "ours", [], None))
        ref = _reference_row(spec, cell.params, table_key, row_key)
        if ref is not None:
            rows.append(Row(title, cell.params[row_key], "document", list(ref["train"]), ref.get("test")))
    return rows


def _reference_row(spec: StudySpec, params: dict, table_key: str | None, row_key: str) -> dict | None:
    for table in spec.reference:
        if table_key and not _same(table.get("table", {}).get(table_key), params.get(table_key)):
            continue
        for row in table.get("rows", []):
            if _same(row["row"], params[row_key]):
                return row
    return None


def render(spec: StudySpec, studies: list, *, fmt: str = "table", figure: str | None = None) -> str:
    figure = figure or spec.report.get("train_figure", "last_batch")
    cells = collect(spec, studies)
    rows = build_rows(spec, cells, figure)
    verdicts = [judge(c, cells, figure) for c in spec.claims]
    names = [s.study_name for s in studies]
    if fmt == "json":
        return json.dumps(
            {
                "studies": names,
                "train_figure": figure,
                "rows": [r.__dict__ for r in rows],
                "claims": [v.__dict__ for v in verdicts],
            },
            indent=2,
            default=str,
        )
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        n = spec.epochs
        writer.writerow(
            [
                "table",
                spec.report.get("rows", ""),
                "source",
                *[f"train_{i + 1}" for i in range(n)],
                "test",
                "test_spread",
                "fit_seconds",
            ]
        )
        for r in rows:
            train = [f"{v:.4f}" for v in r.train] + [""] * (n - len(r.train))
            writer.writerow([r.table, r.row, r.source, *train[:n], _f(r.test), _f(r.spread), _f(r.seconds, 1)])
        return out.getvalue()
    return _text(spec, names, rows, verdicts, figure, cells, markdown=fmt == "markdown")


def _f(value: float | None, digits: int = 4) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _text(spec, names, rows, verdicts, figure, cells, *, markdown: bool) -> str:
    n = spec.epochs
    done = sum(1 for c in cells if c.test)
    seeds = max((len(c.test) for c in cells), default=0)
    what = "accuracy on each epoch's last mini-batch" if figure == "last_batch" else "mean accuracy over each epoch"
    lines = []
    head = "## " if markdown else ""
    lines.append(f"{head}{spec.description or spec.name}")
    lines.append("")
    lines.append(
        f"Studies: {', '.join(names)}; {done} of {len(cells)} cells finished"
        + (f", {seeds} runs per cell (mean shown, spread = max - min)" if seeds > 1 else "")
        + "."
    )
    lines.append(f"Train 1..{n}: {what}. Test: accuracy on the test images.")
    lines.append("")
    row_name = _short(spec.report.get("rows", next(iter(spec.grid))))
    header = [row_name, "source", *[f"Train {i + 1}" for i in range(n)], "Test", "Δ test", "spread", "fit s"]
    by_table: dict[str, list[Row]] = {}
    for r in rows:
        by_table.setdefault(r.table, []).append(r)
    for title, table_rows in by_table.items():
        if title != "all":
            lines.append(f"{'### ' if markdown else ''}{title}")
            lines.append("")
        body = []
        ours_test = None
        for r in table_rows:
            train = [f"{v:.3f}" for v in r.train] + ["-"] * (n - len(r.train))
            delta = ""
            if r.source == "ours":
                ours_test = r.test
            elif ours_test is not None and r.test is not None:
                delta = f"{ours_test - r.test:+.3f}"
            test = "-" if r.test is None else f"{r.test:.3f}"
            body.append(
                [
                    str(r.row) if r.source == "ours" else "",
                    r.source,
                    *train[:n],
                    test,
                    delta,
                    _f(r.spread, 3),
                    _f(r.seconds, 1),
                ]
            )
        lines.extend(_grid(header, body, markdown))
        lines.append("")
    if verdicts:
        lines.append(
            f"{head}The document's claims, judged on these numbers"
            if markdown
            else "The document's claims, judged on these numbers:"
        )
        lines.append("")
        for v in verdicts:
            if markdown:
                lines.append(f'- **{v.verdict}**: "{v.quote}"  \n  {v.because}')
            else:
                lines.append(f"[{v.verdict}] {v.quote}")
                lines.append(f"    {v.because}")
        lines.append("")
    notes = [t["note"] for t in spec.reference if t.get("note")]
    for note in notes:
        lines.append(f"Note: {note}.")
    return "\n".join(lines).rstrip() + "\n"


def _grid(header: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
            "| " + " | ".join(row) + " |" for row in body
        ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = lambda row: "  ".join(str(x).rjust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(row) for row in body]


def studies_table(storage) -> str:
    """What the database holds: each study, its trials by state, best value, and the workers seen."""
    import optuna

    lines = []
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=True)
    if not summaries:
        return "no studies in this database\n"
    header = ["study", "kind", "complete", "pruned", "fail", "running", "waiting", "best", "workers"]
    body = []
    for s in summaries:
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        count = {state: sum(t.state == state for t in trials) for state in TrialState}
        spec = s.user_attrs.get("tuner:spec", {})
        workers = sorted({t.user_attrs.get("worker", "?") for t in trials if t.user_attrs.get("worker")})
        best = "-" if s.best_trial is None else f"{s.best_trial.value:.4f}"
        body.append(
            [
                s.study_name,
                spec.get("kind", "?"),
                str(count[TrialState.COMPLETE]),
                str(count[TrialState.PRUNED]),
                str(count[TrialState.FAIL]),
                str(count[TrialState.RUNNING]),
                str(count[TrialState.WAITING]),
                best,
                ", ".join(workers) or "-",
            ]
        )
    lines.extend(_grid(header, body, markdown=False))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- searches

DOCUMENT_BEST = 0.9787  # the document's best test accuracy: LSTM, 200 units, Adam, 5 epochs


def _epochs_run(t) -> int:
    return int(t.user_attrs.get("epochs_run", len(t.user_attrs.get("history", []))))


def search_summary(spec: StudySpec, study) -> dict:
    """Counts, compute spent and the best trials of a search, from the database."""
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value, reverse=True)
    epochs = sum(_epochs_run(t) for t in finished)
    return {
        "study": study.study_name,
        "trials": {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState},
        "diverged": sum(bool(t.user_attrs.get("diverged")) for t in trials),
        "copied": sum("copied_from" in t.user_attrs for t in trials),
        "epochs_run": epochs,
        "epochs_if_unpruned": len(finished) * spec.epochs,
        "fit_hours": sum(float(t.user_attrs.get("fit_seconds") or 0) for t in finished) / 3600,
        "top": [
            {
                "number": t.number,
                "val_accuracy": t.value,
                "test_accuracy": t.user_attrs.get("test_accuracy"),
                "epochs": _epochs_run(t),
                "params": t.params,
            }
            for t in complete[:10]
        ],  # fmt: skip
    }


def render_search(spec: StudySpec, study, *, fmt: str = "table") -> str:
    if len(study.directions) > 1:
        return _render_pareto(study, fmt)
    s = search_summary(spec, study)
    if fmt == "json":
        return json.dumps(s, indent=2, default=str)
    if fmt == "csv":
        return export(study, "csv")
    md = fmt == "markdown"
    t = s["trials"]
    lines = [f"{'## ' if md else ''}Search {s['study']}: {spec.description}", ""]
    lines.append(
        f"Trials: {t['complete']} complete, {t['pruned']} pruned (of which {s['diverged']} diverged), "
        f"{t['fail']} failed, {t['running']} running, {t['waiting']} queued; {s['copied']} copied from other studies."
    )
    saved = 1 - s["epochs_run"] / s["epochs_if_unpruned"] if s["epochs_if_unpruned"] else 0.0
    lines.append(
        f"Compute: {s['epochs_run']} epochs trained of {s['epochs_if_unpruned']} without pruning "
        f"({saved:.0%} saved), {s['fit_hours']:.2f} h of training."
    )
    lines.append(
        "Protocol: trials are chosen on validation accuracy (the last 10,000 training images, held out); "
        "test accuracy is measured for the record only and never used to choose."
    )
    lines.append("")
    if s["top"]:
        best = s["top"][0]
        test = best["test_accuracy"]
        vs = (
            ""
            if test is None
            else f"; test {test:.4f} against the document's best {DOCUMENT_BEST} ({test - DOCUMENT_BEST:+.4f})"
        )
        lines.append(f"Best: trial {best['number']}, validation {best['val_accuracy']:.4f}{vs}.")
        lines.append("")
        header = ["trial", "val acc", "test acc", "epochs", "params"]
        body = [
            [str(r["number"]), f"{r['val_accuracy']:.4f}", _f(r["test_accuracy"]), str(r["epochs"]),
             " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())]
            for r in s["top"]
        ]  # fmt: skip
        lines.extend(_grid(header, body, md))
    return "\n".join(lines).rstrip() + "\n"


def _render_pareto(study, fmt: str) -> str:
    front = sorted(study.best_trials, key=lambda t: t.values[0], reverse=True)
    rows = [{"number": t.number, "values": t.values, "params": t.params} for t in front]
    if fmt == "json":
        return json.dumps({"study": study.study_name, "pareto_front": rows}, indent=2, default=str)
    header = ["trial", *[f"objective {i}" for i in range(len(study.directions))], "params"]
    body = [[str(r["number"]), *[f"{v:.4f}" for v in r["values"]],
             " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())]
            for r in rows]  # fmt: skip
    return "\n".join([f"Pareto front of {study.study_name} ({len(rows)} trials):", ""]
                     + _grid(header, body, fmt == "markdown")) + "\n"  # fmt: skip


EXPORT_ATTRS = ("test_accuracy", "epochs_run", "fit_seconds", "diverged", "worker", "copied_from", "model_artifact")


def export_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name.lower(),
               "value": t.value if len(study.directions) == 1 else None,
               "values": None if t.values is None or len(study.directions) == 1 else list(t.values)}  # fmt: skip
        row.update({f"params_{k}": v for k, v in t.params.items()})
        row.update({k: t.user_attrs.get(k) for k in EXPORT_ATTRS})
        row["datetime_start"] = t.datetime_start.isoformat() if t.datetime_start else None
        row["datetime_complete"] = t.datetime_complete.isoformat() if t.datetime_complete else None
        rows.append(row)
    return rows


def export(study, fmt: str) -> str:
    """One row per trial: state, value, parameters, the main recorded figures, times."""
    rows = export_rows(study)
    if fmt == "json":
        return json.dumps(rows, indent=2, default=str)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def best_text(study, trial, test_again: float) -> str:
    recorded = trial.user_attrs.get("test_accuracy")
    same = recorded is not None and abs(test_again - recorded) < 1e-4
    params = ", ".join(f"{k}={v}" for k, v in trial.params.items())
    lines = [
        f"best trial of {study.study_name}: #{trial.number} ({params})",
        "  objective (validation accuracy for a search, test accuracy for a grid; robust: clean, FGSM): "
        + ", ".join(f"{v:.4f}" for v in trial.values),
        f"  test accuracy recorded: {_f(recorded)}; saved model re-evaluated now: {test_again:.4f} "
        + ("(the same model)" if same else "(DIFFERS from the record)"),
        f"  model artifact: {trial.user_attrs.get('model_artifact')}",
    ]
    return "\n".join(lines) + "\n"


def confusions_text(name: str, number: int, matrix, pairs, consistent, top: list[int]) -> str:
    total = int(matrix.sum())
    correct = int(matrix.trace())
    lines = [f"{name}, trial {number}: {correct}/{total} test images right ({correct / total:.4f})", "",
             "confusion matrix (rows: true digit, columns: predicted)", ""]  # fmt: skip
    header = ["true", *[str(c) for c in range(matrix.shape[1])]]
    lines += _grid(header, [[str(r), *[str(int(v)) for v in row]] for r, row in enumerate(matrix)], False)
    lines += ["", "most confused pairs (true -> predicted: count):"]
    lines += [f"  {t} -> {p}: {c}" for t, p, c in pairs]
    if consistent:
        lines += ["", f"confused consistently by the top {len(top)} saved models (trials {top}), summed:"]
        lines += [f"  {t} -> {p}: {c}" for t, p, c in consistent]
    return "\n".join(lines) + "\n"
