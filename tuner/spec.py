"""Study files: declarative TOML read into a checked `StudySpec`. An unknown key is an error, never ignored.

A study file holds what differs from the defaults below: the fixed model, the training settings, the grid or
the search space, the sampler and pruner, and, for the document's grids, its tables and claims (`reference`,
`claims`), transcribed once so reports can set our numbers beside them. The whole spec is stored with the
study, so reports need only the database.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.errors import SpecError
from tuner.models import CELLS, OPTIMIZERS, ModelConfig

_HERE = Path(__file__).resolve().parent
# Installed, the study files are package data (tuner/studies); in a source checkout they sit at the top.
STUDIES_DIR = _HERE / "studies" if (_HERE / "studies").is_dir() else _HERE.parent / "studies"
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig))
PARAM_KEYS = (*MODEL_KEYS, "batch_size")
SAMPLERS = ("grid", "tpe", "random", "gp", "cmaes")
PRUNERS = ("hyperband", "successive-halving", "median", "none")
# bench/pruning.py, 6,000 images, 100 trials, seeds 0 to 4, steps counted in epochs trained (BENCHMARKS.md):
# successive halving (rungs after epochs 1, 3, 9) saved 58.4-75.2% of the epochs (mean 67.7%), its best 0.00-0.90
# points behind the unpruned search's (mean 0.38); the median pruner saved 43.6-66.0% (mean 56.4%), -0.60-0.20
# behind (mean 0.00).
# At a budget of about 70 epochs (bench/vs_kerastuner.py) successive halving's best was 86.3% against the median
# pruner's 83.1% (mean of 5 seeds): the median pruner prunes nothing until 5 trials have finished.
DEFAULT_SEARCH_PRUNER = "successive-halving"
CHECKS = ("chance_level", "converges", "flat", "separates", "gain", "best_gain", "not_worth", "best")
TRAIN_FIGURES = ("last_batch", "mean")
OBJECTIVES = ("accuracy", "robust")


@dataclass(frozen=True)
class Param:
    """One dimension of a search space."""

    name: str
    type: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()
    reason: str = ""


@dataclass(frozen=True)
class Claim:
    """A sentence of the document, with the check that gives it a verdict from our data."""

    quote: str
    check: str
    where: dict = field(default_factory=dict)
    param: str = ""
    a: Any = None
    b: Any = None
    threshold: float | None = None


@dataclass(frozen=True)
class StudySpec:
    name: str
    kind: str  # grid | search
    description: str = ""
    model: dict = field(default_factory=dict)  # fixed ModelConfig fields
    batch_size: int = 128
    epochs: int = 5
    seed: int = 0
    subset: int | None = None
    data: str | None = None
    validation: bool = False
    grid: dict = field(default_factory=dict)  # param -> list of values
    space: tuple[Param, ...] = ()
    sampler: str = "grid"
    pruner: str = "none"
    report: dict = field(default_factory=dict)  # rows, tables, train_figure
    reference: tuple[dict, ...] = ()
    claims: tuple[Claim, ...] = ()
    enqueue: tuple[dict, ...] = ()  # configurations a search runs first
    objective: str = "accuracy"  # or "robust": maximise clean and FGSM validation accuracy (two objectives)
    robust_eps: float = 0.1  # the FGSM step of the robust objective, on pixels in [0, 1]

    @property
    def n_cells(self) -> int:
        return math.prod(len(v) for v in self.grid.values())

    def cells(self) -> list[dict]:
        """Every grid cell as a parameter dict, in the grid's order."""
        return [dict(zip(self.grid, combo)) for combo in itertools.product(*self.grid.values())]

    def with_overrides(self, **overrides: Any) -> StudySpec:
        """The spec with command-line options applied (None means: keep the file's value), re-checked."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        return validate(dataclasses.replace(self, **changes)) if changes else self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> StudySpec:
        raw = dict(raw)
        raw["space"] = tuple(Param(**{**p, "choices": tuple(p["choices"])}) for p in raw.get("space", ()))
        raw["claims"] = tuple(Claim(**c) for c in raw.get("claims", ()))
        raw["reference"] = tuple(raw.get("reference", ()))
        raw["enqueue"] = tuple(raw.get("enqueue", ()))
        return cls(**raw)

    def model_config(self, params: dict) -> ModelConfig:
        values = {**self.model, **{k: v for k, v in params.items() if k in MODEL_KEYS}}
        return ModelConfig(**values)


def cell_key(params: dict, names) -> tuple:
    """A hashable identity for a grid cell (repr keeps 0.001 and 0.0010 equal, 1 and 1.0 apart)."""
    return tuple(repr(params.get(n)) for n in names)


def available() -> list[str]:
    """Names of the study files shipped with tuner."""
    return sorted(p.stem for p in STUDIES_DIR.glob("*.toml"))


def load(name_or_path: str) -> StudySpec:
    """A shipped study by name (`lr-batch`) or any study file by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = STUDIES_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise SpecError(f"unknown study {name_or_path!r}; shipped studies: {', '.join(available())}")
    elif not path.is_file():
        raise SpecError(f"study file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: malformed TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read: {exc}") from None
    try:
        return parse(raw, default_name=path.stem)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None


def _take(table: dict, where: str, allowed: dict[str, type | tuple]) -> dict:
    if not isinstance(table, dict):
        raise SpecError(f"[{where}] must be a table")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise SpecError(f"unknown key {unknown[0]!r} in [{where}]; allowed: {', '.join(allowed)}")
    for key, value in table.items():
        expected = allowed[key]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, expected) or (isinstance(value, bool) and expected in (int, float)):
            raise SpecError(f"[{where}] {key} has the wrong type ({type(value).__name__})")
    return table


_PARAM_TYPES: dict[str, type | tuple] = {
    "cell": str, "units": int, "layers": int, "dropout": float, "optimizer": str,
    "learning_rate": float, "momentum": float, "batch_size": int, "adv_eps": float, "adv_share": float,
}  # fmt: skip


def parse(raw: dict, *, default_name: str = "study") -> StudySpec:
    """Check a decoded study file and build its spec."""
    _take(
        raw,
        "top level",
        {k: dict for k in ("study", "model", "training", "data", "grid", "search", "sampler", "pruner", "report")}
        | {"reference": list, "claims": list, "enqueue": list},
    )
    study = _take(raw.get("study", {}), "study", {"name": str, "kind": str, "description": str})
    model = _take(raw.get("model", {}), "model", {k: v for k, v in _PARAM_TYPES.items() if k != "batch_size"})
    training = _take(
        raw.get("training", {}),
        "training",
        {"epochs": int, "batch_size": int, "seed": int, "validation": bool, "objective": str, "robust_eps": float},
    )
    data = _take(raw.get("data", {}), "data", {"path": str, "subset": int})
    sampler = _take(raw.get("sampler", {}), "sampler", {"name": str})
    pruner = _take(raw.get("pruner", {}), "pruner", {"name": str})
    report = _take(raw.get("report", {}), "report", {"rows": str, "tables": str, "train_figure": str})
    grid = _take(raw.get("grid", {}), "grid", {k: list for k in PARAM_KEYS})
    space = tuple(_param(name, table) for name, table in raw.get("search", {}).items())
    kind = study.get("kind", "grid" if grid else "search")
    spec = StudySpec(
        name=study.get("name", default_name),
        kind=kind,
        description=study.get("description", ""),
        model=model,
        batch_size=training.get("batch_size", 128),
        epochs=training.get("epochs", 5),
        seed=training.get("seed", 0),
        subset=data.get("subset"),
        data=data.get("path"),
        validation=training.get("validation", kind == "search"),
        objective=training.get("objective", "accuracy"),
        robust_eps=training.get("robust_eps", 0.1),
        grid={k: list(v) for k, v in grid.items()},
        space=space,
        sampler=sampler.get("name", "grid" if kind == "grid" else "tpe"),
        pruner=pruner.get("name", "none" if kind == "grid" else DEFAULT_SEARCH_PRUNER),
        report=report,
        reference=tuple(_reference(i, r) for i, r in enumerate(raw.get("reference", []))),
        claims=tuple(_claim(i, c) for i, c in enumerate(raw.get("claims", []))),
        enqueue=tuple(_take(e, f"enqueue {i + 1}", _PARAM_TYPES) for i, e in enumerate(raw.get("enqueue", []))),
    )
    return validate(spec)


def _param(name: str, table: dict) -> Param:
    if name not in PARAM_KEYS:
        raise SpecError(f"unknown search parameter {name!r}; known: {', '.join(PARAM_KEYS)}")
    t = _take(
        table, f"search.{name}", {"type": str, "low": float, "high": float, "log": bool, "choices": list, "reason": str}
    )
    return Param(
        name=name,
        type=t.get("type", "categorical" if "choices" in t else "float"),
        low=t.get("low"),
        high=t.get("high"),
        log=t.get("log", False),
        choices=tuple(t.get("choices", ())),
        reason=t.get("reason", ""),
    )


def _reference(i: int, table: dict) -> dict:
    ref = _take(table, f"reference {i + 1}", {"table": dict, "train_figure": str, "rows": list, "note": str})
    for j, row in enumerate(ref.get("rows", [])):
        _take(row, f"reference {i + 1} row {j + 1}", {"row": (int, float, str), "train": list, "test": float})
    return ref


def _claim(i: int, table: dict) -> Claim:
    c = _take(
        table,
        f"claims {i + 1}",
        {
            "quote": str,
            "check": str,
            "where": dict,
            "param": str,
            "a": (int, float, str),
            "b": (int, float, str),
            "threshold": float,
        },
    )
    if c.get("check") not in CHECKS:
        raise SpecError(f"claims {i + 1}: check must be one of {', '.join(CHECKS)}")
    if "quote" not in c:
        raise SpecError(f"claims {i + 1}: a claim needs its quote")
    return Claim(**c)


def _check_value(name: str, value: Any) -> None:
    expected = _PARAM_TYPES[name]
    ok = isinstance(value, expected) or (expected is float and isinstance(value, int))
    if isinstance(value, bool) or not ok:
        raise SpecError(f"{name} value {value!r} has the wrong type")
    if name == "batch_size" and value < 1:
        raise SpecError(f"batch_size must be >= 1, got {value}")


def validate(spec: StudySpec) -> StudySpec:
    """Every range and name checked here, so nothing is written before a bad value is found."""
    if spec.kind not in ("grid", "search"):
        raise SpecError(f"study kind must be 'grid' or 'search', got {spec.kind!r}")
    if not spec.name or len(spec.name) > 200:
        raise SpecError("study name must be 1 to 200 characters")
    if spec.epochs < 1:
        raise SpecError(f"epochs must be >= 1, got {spec.epochs}")
    if spec.subset is not None and spec.subset < 10:
        raise SpecError(f"subset must be >= 10, got {spec.subset}")
    _check_value("batch_size", spec.batch_size)
    if spec.objective not in OBJECTIVES:
        raise SpecError(f"unknown objective {spec.objective!r}; choose from {', '.join(OBJECTIVES)}")
    if spec.objective == "robust" and (spec.kind != "search" or not spec.validation):
        raise SpecError("the robust objective is for searches, which hold out a validation split")
    if not 0.0 < spec.robust_eps <= 1.0:
        raise SpecError(f"robust_eps must be in (0, 1], got {spec.robust_eps}")
    if spec.sampler not in SAMPLERS:
        raise SpecError(f"unknown sampler {spec.sampler!r}; choose from {', '.join(SAMPLERS[1:])}")
    if spec.pruner not in PRUNERS:
        raise SpecError(f"unknown pruner {spec.pruner!r}; choose from {', '.join(PRUNERS)}")
    for name, value in spec.model.items():
        _check_value(name, value)
    if spec.kind == "grid":
        if not spec.grid or spec.space:
            raise SpecError("a grid study needs a [grid] table and no [search] tables")
        if spec.sampler != "grid":
            raise SpecError("a grid study runs with the grid sampler")
        for name, values in spec.grid.items():
            if not values or len(set(map(repr, values))) != len(values):
                raise SpecError(f"grid {name} must list distinct values")
            for value in values:
                _check_value(name, value)
        cells = spec.cells()
    else:
        if not spec.space or spec.grid:
            raise SpecError("a search study needs [search.*] tables and no [grid] table")
        if spec.sampler == "grid":
            raise SpecError("a search study cannot use the grid sampler")
        for p in spec.space:
            _check_param(p)
        cells = [{p.name: (p.choices[0] if p.type == "categorical" else p.low) for p in spec.space}]
    for cell in cells:  # the fixed model with grid values (or the space's corners) must be a valid model
        try:
            spec.model_config(cell)
        except ValueError as exc:
            raise SpecError(str(exc)) from None
    if spec.kind == "search":
        corner = {p.name: (p.choices[-1] if p.type == "categorical" else p.high) for p in spec.space}
        try:
            spec.model_config(corner)
        except ValueError as exc:
            raise SpecError(str(exc)) from None
    for i, point in enumerate(spec.enqueue):
        problem = outside(spec, point)
        if problem:
            raise SpecError(f"enqueue {i + 1}: {problem}")
    figure = spec.report.get("train_figure", "last_batch")
    if figure not in TRAIN_FIGURES:
        raise SpecError(f"report.train_figure must be one of {', '.join(TRAIN_FIGURES)}")
    for key in ("rows", "tables"):
        if key in spec.report and spec.report[key] not in spec.grid:
            raise SpecError(f"report.{key} names {spec.report[key]!r}, which is not a grid parameter")
    return spec


def outside(spec: StudySpec, params: dict) -> str | None:
    """Why `params` is not a point of the search space (None when it is)."""
    space = {p.name: p for p in spec.space}
    if set(params) != set(space):
        missing, extra = sorted(set(space) - set(params)), sorted(set(params) - set(space))
        return f"needs every search parameter: missing {missing}, not in the space {extra}"
    for name, value in params.items():
        p = space[name]
        if p.type == "categorical":
            if value not in p.choices:
                return f"{name}={value!r} is not among {list(p.choices)}"
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not p.low <= value <= p.high:
            return f"{name}={value!r} is outside [{p.low}, {p.high}]"
    return None


def _check_param(p: Param) -> None:
    if p.type == "categorical":
        if not p.choices:
            raise SpecError(f"search.{p.name}: categorical needs a non-empty choices list")
        for value in p.choices:
            _check_value(p.name, value)
        if p.name == "cell" and not set(p.choices) <= set(CELLS):
            raise SpecError(f"search.cell: choices must be among {', '.join(CELLS)}")
        if p.name == "optimizer" and not set(p.choices) <= set(OPTIMIZERS):
            raise SpecError(f"search.optimizer: choices must be among {', '.join(OPTIMIZERS)}")
        return
    if p.type not in ("float", "int"):
        raise SpecError(f"search.{p.name}: type must be float, int or categorical, got {p.type!r}")
    if p.low is None or p.high is None:
        raise SpecError(f"search.{p.name}: needs low and high")
    if p.low > p.high:
        raise SpecError(f"search.{p.name}: low ({p.low}) is greater than high ({p.high})")
    if p.log and p.low <= 0:
        raise SpecError(f"search.{p.name}: a log range must stay above 0 (low is {p.low})")
    if p.type == "int" and (p.low != int(p.low) or p.high != int(p.high)):
        raise SpecError(f"search.{p.name}: an int range needs whole-number bounds")
