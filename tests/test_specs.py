"""Every shipped study file is valid, and its reference tables line up with its grid."""

from __future__ import annotations

import pytest

from tuner import spec as specs
from tuner.spec import cell_key


@pytest.mark.parametrize("name", specs.available())
def test_shipped_study_file_is_valid(name):
    spec = specs.load(name)
    assert spec.name == name
    if spec.kind != "grid":
        return
    row_key = spec.report.get("rows", next(iter(spec.grid)))
    table_key = spec.report.get("tables")
    keys = {cell_key(c, spec.grid) for c in spec.cells()}
    for table in spec.reference:
        for row in table["rows"]:
            params = {row_key: row["row"], **({table_key: table["table"][table_key]} if table_key else {})}
            assert cell_key(params, spec.grid) in keys, (name, params)
            assert len(row["train"]) == spec.epochs
    for claim in spec.claims:
        assert set(claim.where) <= set(spec.grid)
        assert not claim.param or claim.param in spec.grid


def test_document_grids_have_the_documents_shape():
    assert specs.load("lr-batch").n_cells == 16
    assert specs.load("lr-units").n_cells == 20
    assert specs.load("lstm-optimizer").n_cells == 4
    assert specs.load("cell-type").n_cells == 3
    ref = specs.load("lr-batch").reference
    assert [t["table"]["batch_size"] for t in ref] == [32, 64, 128, 256]
    assert ref[3]["rows"][0]["row"] == 0.0001  # the document's mislabelled first row of "Batch Size = 256"


def test_overrides_are_checked():
    spec = specs.load("lr-batch")
    assert spec.with_overrides(epochs=2, subset=None).epochs == 2
    with pytest.raises(specs.SpecError, match="epochs must be >= 1"):
        spec.with_overrides(epochs=0)
