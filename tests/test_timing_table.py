"""scripts/timing_table.py: the README's timing rows, from what a run directory recorded."""

from __future__ import annotations

import json

import pytest

import timing_table
from gan import runs


def finished_run(tmp_path, scores, notebook="Vanilla_GAN.ipynb"):
    run = tmp_path / "run"
    run.mkdir()
    runs.write_json(run / "config.json", {"notebook": notebook, "device_resolved": "cpu", "threads": 2,
                                          "cpu": "AMD EPYC (AVX2 only)"})
    runs.write_metrics_csv(run / "metrics.csv", [{"epoch": i + 1, "train_seconds": 30.0 * (i + 1), "score": s}
                                                 for i, s in enumerate(scores)])
    runs.write_json(run / "metrics.json", {"results": {"GAN (this run)": {"fd": 0.5213}}})
    (run / notebook).write_text(json.dumps({"metadata": {"papermill": {
        "start_time": "2026-12-02T10:00:00.000000", "end_time": "2026-12-02T10:26:04.500000"}}}))
    return run


def test_a_row_names_the_machine_and_when_the_score_was_first_reached(tmp_path, capsys):
    run = finished_run(tmp_path, [8.1, 9.05, 8.9, 9.2])
    assert timing_table.main([str(run)]) == 0
    header, rule, line = capsys.readouterr().out.strip().split("\n")
    assert line == ("| Vanilla_GAN.ipynb | AMD EPYC (AVX2 only), 2 threads | 26 min 04 s | 2.0 min | 30.0 s | "
                    "score 9 after 1.0 min (epoch 2) | 0.52 |")


def test_colour_images_are_timed_to_a_frechet_distance_and_a_miss_says_so(tmp_path):
    run = finished_run(tmp_path, [1.5, 1.6], notebook="DCGAN.ipynb")
    rows = [{"epoch": 1, "train_seconds": 60.0, "fd": 80.0}, {"epoch": 2, "train_seconds": 120.0, "fd": 49.0}]
    runs.write_metrics_csv(run / "metrics.csv", rows)
    assert "| FD 50 after 2.0 min (epoch 2) |" in timing_table.row(run)
    runs.write_metrics_csv(run / "metrics.csv", rows[:1])
    assert "| FD not 50 in 1 epochs |" in timing_table.row(run)


def test_a_directory_that_is_not_a_run_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        timing_table.main([str(tmp_path)])
    assert "not a run directory" in capsys.readouterr().err
