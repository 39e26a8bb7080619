"""The recipe-sweep script behind the README's "What we tried"."""

import json

import pytest

import sweep


def test_lr_factor_linear_decay():
    a = sweep.parse_args(["--decay", "linear", "--decay-from", "0.5", "--decay-to", "0.1"])
    assert [sweep.lr_factor(s, 100, a) for s in (0, 50, 75, 100)] == pytest.approx([1.0, 1.0, 0.55, 0.1])
    assert sweep.lr_factor(75, 100, sweep.parse_args([])) == 1.0  # no decay by default


def test_defaults_are_the_notebooks():
    a = sweep.parse_args([])
    defaults = sweep.notebook_defaults()
    assert (a.lr_g, a.r1_gamma, a.d_dropout, a.ema_decay, a.batch_size) == (
        defaults["lr_g"], defaults["r1_gamma"], defaults["d_dropout"], defaults["ema_decay"], defaults["batch_size"])


def test_sweep_scores_every_epoch_and_at_the_end(tmp_path, data_dir):
    out = tmp_path / "sweep.json"
    result = sweep.main(["--data-dir", str(data_dir), "--train-subset", "512", "--epochs", "2",
                         "--final-samples", "300", "--out", str(out)])
    assert [row["epoch"] for row in result["rows"]] == [1, 2]
    assert all(1 <= row["score"] <= 10 and row["fd"] > 0 for row in result["rows"])
    assert result["rows"][1]["train_seconds"] > result["rows"][0]["train_seconds"] > 0
    final = result["final"]
    assert 0 <= final["precision"] <= 1 and 0 <= final["recall"] <= 1
    assert 0 <= final["min_share"] <= 0.1 <= final["max_share"] <= 1
    assert json.loads(out.read_text())["final"] == final


def test_sweep_scores_other_ema_decays_of_the_same_run(tmp_path, data_dir):
    args = ["--data-dir", str(data_dir), "--train-subset", "256", "--epochs", "1", "--final-samples", "200"]
    plain = sweep.main(args + ["--out", str(tmp_path / "plain.json")])
    result = sweep.main(args + ["--also-ema", "0.2", "0.999", "--out", str(tmp_path / "also.json")])
    assert result["rows"] == [{**plain["rows"][0], "train_seconds": result["rows"][0]["train_seconds"]}]  # same run
    assert result["final"] == plain["final"]
    assert set(result["final_also_ema"]) == {"0.2", "0.999"}
    # The same decay as the main EMA gives the same generator, hence the same scores.
    assert result["final_also_ema"]["0.999"] == plain["final"]
    # 0.2 is below the warm-up's (1 + t) / (10 + t) from the second step on; 0.99 would not be within 4 steps.
    assert result["final_also_ema"]["0.2"]["fd"] != plain["final"]["fd"]


def test_sweep_gives_the_final_scores_after_chosen_epochs(tmp_path, data_dir):
    args = ["--data-dir", str(data_dir), "--train-subset", "256", "--epochs", "2", "--final-samples", "200"]
    result = sweep.main(args + ["--score-at", "1", "2", "--out", str(tmp_path / "at.json")])
    assert "final" not in sweep.main(args + ["--out", str(tmp_path / "plain.json")])["rows"][0]
    assert result["rows"][1]["final"] == result["final"]  # after the last epoch: the final scores
    assert result["rows"][0]["final"] != result["final"]  # after epoch 1: another generator
    assert 0 <= result["rows"][0]["final"]["recall"] <= 1
