"""Slices of the test split over manifest columns: the table, the gates, a photo folder's
meta.csv, and the evaluate stage's report of them."""

import json

import pandas as pd
import pytest

from synermix.config import parse_params
from synermix.data.manifest import BASE_COLUMNS
from synermix.data.sources import list_folder
from synermix.errors import UserError
from synermix.gates import slice_gates
from synermix.slices import slice_columns, slice_table

BASE = list(BASE_COLUMNS)


def frames():
    # 4 mono images (3 right), 2 poly (none right), 1 without a cell type; crack is the defect
    test_rows = pd.DataFrame(
        {
            "path": [f"{i}.png" for i in range(7)],
            "cell_type": ["mono"] * 4 + ["poly", "poly", ""],
        }
    )
    predictions = pd.DataFrame(
        {
            "path": [f"{i}.png" for i in range(7)],
            "actual": ["crack", "crack", "ok", "ok", "crack", "ok", "ok"],
            "predicted": ["crack", "ok", "ok", "ok", "ok", "crack", "ok"],
            "confidence": [0.9] * 7,
            "correct": [True, False, True, True, False, False, True],
            "decision": ["reject", "accept", "accept", "reject", "accept", "reject", "accept"],
        }
    )
    return test_rows, predictions


def test_slice_table_per_value_with_the_line_rates():
    table = slice_table(*frames(), ["cell_type"], ["crack"]).set_index("value")
    assert table.index.tolist() == ["(none)", "mono", "poly"]  # an empty value is its own slice
    mono = table.loc["mono"]
    assert (mono["images"], mono["accuracy"]) == (4, 0.75)
    assert mono["macro_recall"] == pytest.approx((0.5 + 1.0) / 2)
    assert mono["escape_rate"] == 0.5 and mono["overkill_rate"] == 0.5  # 1 of 2 crack accepted
    assert table.loc["poly", "escape_rate"] == 1.0 and table.loc["poly", "overkill_rate"] == 1.0
    assert table.loc["(none)", "images"] == 1 and pd.isna(table.loc["(none)", "escape_rate"])
    assert 0 <= mono["accuracy_ci95_low"] < 0.75 < mono["accuracy_ci95_high"] <= 1
    # without defect classes there are no line rates
    assert slice_table(*frames(), ["cell_type"], []).set_index("value")["escape_rate"].isna().all()


def test_slice_gates_judge_the_worst_big_slice_only():
    rows = slice_table(*frames(), ["cell_type"], ["crack"]).to_dict("records")
    lax = parse_params({"gates": {"slice_min_images": 2, "max_slice_accuracy_gap": 0.6}}).gates
    gap, escape = slice_gates(rows, 0.5, lax)
    assert gap.gate == "max_slice_accuracy_gap" and gap.observed == pytest.approx(0.5)  # poly: 0.0
    assert gap.passed is True and "worst: cell_type=poly" in gap.note
    assert escape.passed is None and escape.note == "off (null in params)"
    strict = parse_params(
        {"gates": {"slice_min_images": 2, "max_slice_accuracy_gap": 0.4, "max_slice_escape_rate": 0.6}}
    ).gates
    gap, escape = slice_gates(rows, 0.5, strict)
    assert gap.passed is False and escape.passed is False and escape.observed == 1.0
    # slices smaller than slice_min_images are reported, not gated: only mono (4) is left
    only_mono = parse_params({"gates": {"slice_min_images": 3, "max_slice_accuracy_gap": 0.0}}).gates
    (gap, _) = slice_gates(rows, 0.75, only_mono)
    assert gap.passed is True and "cell_type=mono" in gap.note
    (gap, _) = slice_gates(rows, 0.5, parse_params({"gates": {"slice_min_images": 100}}).gates)
    assert gap.passed is None and "no slices of at least 100" in gap.note


def test_slice_columns_auto_per_source_and_named_ones_checked():
    elpv = [*BASE, "defect_probability", "cell_type"]
    assert slice_columns("auto", "elpv", elpv) == ["cell_type"]
    assert slice_columns("auto", "folder", [*BASE, "camera", "shift"]) == ["camera", "shift"]
    assert slice_columns("auto", "folder", BASE) == []
    assert slice_columns("auto", "fashion-mnist", [*BASE, "source_set", "source_index"]) == []
    with pytest.raises(UserError, match=r"evaluate.slices names column.s. line .*extra columns: camera"):
        slice_columns(["line"], "folder", [*BASE, "camera"])


def test_meta_csv_columns_join_the_listing(make_dataset, caplog):
    root = make_dataset({"crack": 2, "ok": 2})
    (root / "meta.csv").write_text(
        "path,camera,shift\ncrack/img000.png,cam1,night\nok/img001.png,cam2,day\nok/gone.png,cam9,day\n"
    )
    listing = list_folder(root)
    assert listing.extra_columns == ("camera", "shift")
    extra = {item.source_path: item.extra for item in listing.items}
    assert extra["crack/img000.png"] == {"camera": "cam1", "shift": "night"}
    assert extra["ok/img000.png"] == {"camera": "", "shift": ""}  # not listed: empty values
    assert "1 row(s) name no image in the folder (ignored): ok/gone.png" in caplog.text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("camera\ncam1\n", "has no 'path' column"),
        ("path,camera\ncrack/img000.png,a\ncrack/img000.png,b\n", "lists 'crack/img000.png' twice"),
        ("path,label\ncrack/img000.png,x\n", "taken by the manifest"),
    ],
)
def test_a_bad_meta_csv_is_one_clear_message(make_dataset, text, message):
    root = make_dataset({"crack": 2, "ok": 2})
    (root / "meta.csv").write_text(text)
    with pytest.raises(UserError, match=message):
        list_folder(root)


@pytest.mark.integration  # trains a model
def test_evaluate_reports_and_gates_the_slices_of_a_photo_folder(tmp_path, make_dataset, train_project):
    from synermix.stages.evaluate import run_evaluate

    counts = {"crack": 30, "ok": 30}
    root = make_dataset(counts)
    lines = ["path,camera"] + [f"{c}/img{i:03d}.png,cam{i % 2 + 1}" for c in counts for i in range(30)]
    (root / "meta.csv").write_text("\n".join(lines) + "\n")
    raw = train_project(counts, "slices-test")
    manifest = pd.read_csv(tmp_path / "data/prepared/manifest.csv")
    assert set(manifest["camera"]) == {"cam1", "cam2"}
    gates = {"enforce": False, "slice_min_images": 1, "max_slice_accuracy_gap": 0.0}
    summary = run_evaluate(parse_params({**raw, "gates": gates}), tmp_path)

    table = pd.read_csv(tmp_path / "reports/evaluation/slices.csv")
    test = manifest[manifest["split"] == "test"]
    assert table["column"].tolist() == ["camera", "camera"]
    assert table.set_index("value")["images"].to_dict() == test["camera"].value_counts().to_dict()
    assert summary["slices"] == json.loads((tmp_path / "reports/evaluation.json").read_text())["slices"]
    gate = summary["gates"]["max_slice_accuracy_gap"]
    worst = table["accuracy"].min()
    assert gate["observed"] == pytest.approx(summary["test"]["accuracy"] - worst)
    assert gate["status"] == ("pass" if gate["observed"] <= 1e-12 else "FAIL")
    report = (tmp_path / "reports/evaluation.md").read_text()
    assert "## Slices (test split)" in report and "| camera | cam1 |" in report
