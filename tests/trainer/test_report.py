"""Multi-seed aggregation and the bench/results JSON format of ../shared/BENCHMARKS.md."""

import json

import pytest

from trainer.report import aggregate, format_table, write_results


def report(seed, overall, few):
    return {"seed": seed, "final": {"overall": overall, "many": 80.0, "medium": 60.0, "few": few}}


def test_aggregate_mean_std_and_empty_group():
    row = aggregate([report(0, 50.0, 10.0), report(1, 52.0, 14.0), report(2, 54.0, 12.0)])
    assert row["seeds"] == [0, 1, 2]
    assert row["overall"] == 52.0 and row["overall_std"] == pytest.approx(2.0)
    assert row["few"] == 12.0 and row["few_std"] == pytest.approx(2.0)
    empty = aggregate([report(0, 50.0, None), report(1, 52.0, None)])
    assert empty["few"] is None and empty["few_std"] is None


def test_table_shows_dash_for_empty_group():
    text = format_table([{"method": "ssd", "imbalance_factor": 10, **aggregate([report(0, 62.3, None)])}])
    lines = text.splitlines()
    assert lines[0].split() == ["method", "imbalance_factor", "overall", "many", "medium", "few"]
    assert lines[2].split()[-1] == "-" and "62.30" in lines[2]


def test_results_file_format(tmp_path):
    path = write_results("accuracy", [{"method": "ce"}], "ltd reproduce embedded", tmp_path, name="accuracy_x")
    doc = json.loads(path.read_text())
    assert path.name == "accuracy_x-cpu.json"
    assert {"benchmark", "date", "git_commit", "machine", "command", "rows"} <= set(doc)
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["gpu"] is None and doc["rows"] == [{"method": "ce"}]


def test_a_run_is_placed_against_the_reference_band(tmp_path):
    import json

    from trainer.report import band_lines, reference_band

    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps({"rows": [
        {"method": "ce", "overall": 67.6, "overall_std": 1.5, "seeds": list(range(10))},
        {"method": "ssd", "overall": 77.7, "overall_std": 1.0, "seeds": list(range(10))},
        {"method": "ssd_views", "overall": 77.8, "overall_std": None, "seeds": [0]}]}))
    band = reference_band(path)
    assert set(band) == {"ce", "ssd"}  # a row without a spread is no band
    lines = band_lines([{"method": "ce", "overall": 64.7}, {"method": "ssd", "overall": 75.6},
                        {"method": "lws", "overall": 76.0}], band)
    assert len(lines) == 2  # no reference for lws: no line
    assert "inside [64.6, 70.6]" in lines[0] and "10 seeds" in lines[0]
    assert "OUTSIDE [75.7, 79.7]" in lines[1]
