"""The recipe-sweep script behind docs/experiments.md."""

import json

import pytest

from gan import vanilla_gan as method
import sweep


def test_defaults_are_the_notebooks():
    defaults = method.notebook_parameters()
    assert sweep.recipe(sweep.parse_args([])) == {name: defaults[name] for name in sweep.RECIPE_PARAMETERS}


def test_options_are_typed_like_the_notebooks_parameters():
    s = sweep.recipe(sweep.parse_args(["--g-batchnorm", "0", "--g-loss", "minimax", "--r1-every", "2", "--lr-d", "1e-3"]))
    assert (s["g_batchnorm"], s["g_loss"], s["r1_every"], s["lr_d"]) == (False, "minimax", 2, 1e-3)
    s = sweep.recipe(sweep.parse_args(["--d-hidden", "1024", "512", "256", "--g-hidden", "64"]))
    assert (s["d_hidden"], s["g_hidden"]) == ([1024, 512, 256], [64])


@pytest.mark.parametrize("argv, message", [(["--beta1", "1.5"], "beta1 = 1.5"), (["--g-loss", "hinge"], "g_loss"),
                                           (["--g-batchnorm", "maybe"], "expected 1/0"),
                                           (["--d-hidden", "wide"], "expected layer widths"), (["--d-hidden", "auto"], "expected layer widths"), (["--d-hidden", "0"], "d_hidden = [0]"),
                                           # the script's own options: refused before training, not after it
                                           (["--final-samples", "3"], "at least 4 samples"), (["--final-samples", "-1"], "at least 4"),
                                           (["--epochs", "0"], "at least 1 epoch"), (["--also-ema", "1.5"], "between 0 and 1"),
                                           (["--epochs", "5", "--score-at", "9"], "between 1 and --epochs (5)"),
                                           (["--device", "bogus"], "--device 'bogus'")])
def test_bad_settings_are_refused_with_the_notebooks_rules(argv, message, capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(argv)
    assert message in capsys.readouterr().err


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
    args = ["--data-dir", str(data_dir), "--train-subset", "256", "--epochs", "2", "--final-samples", "200"]
    plain = sweep.main(args + ["--out", str(tmp_path / "plain.json")])
    result = sweep.main(args + ["--also-ema", "0.2", "0.999", "--out", str(tmp_path / "also.json")])
    for row, plain_row in zip(result["rows"], plain["rows"], strict=True):
        also = row.pop("also_ema")
        # The same run: scoring the other averages after epoch 1 leaves epoch 2's training alone.
        assert row == {**plain_row, "train_seconds": row["train_seconds"]}
        # Scored every epoch on the notebook's 2,000 latents: the main decay's copy gives the main scores.
        assert also["0.999"] == {"score": row["score"], "fd": row["fd"]}
        assert also["0.2"]["fd"] != row["fd"]
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
