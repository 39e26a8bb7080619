"""gan/settings.py: every parameter checked before any work, with messages that say what to use;
the "auto" widths of D; whether a checkpoint's settings fit, old checkpoints included."""

from __future__ import annotations

import pytest
import torch

from gan import errors
from gan import runs
from gan import settings
from gan import vanilla_gan as method


@pytest.fixture(scope="module")
def defaults() -> dict:
    """The notebook's default parameters (its `parameters` cell, exported)."""
    return settings.parameters_from(method.notebook_parameters())


def bad(defaults, **changes):
    """The ParameterError message for the defaults with `changes`."""
    with pytest.raises(errors.ParameterError) as info:
        settings.validate_parameters({**defaults, **changes})
    return str(info.value)


def test_defaults_are_valid(defaults):
    assert set(defaults) == set(settings.PARAMETER_RULES)
    settings.validate_parameters(defaults)  # no exception


def test_parameters_from_names_a_missing_parameter(defaults):
    namespace = dict(defaults)
    del namespace["lr_d"]
    with pytest.raises(errors.ParameterError, match="lr_d"):
        settings.parameters_from(namespace)


@pytest.mark.parametrize("name, value, allowed", [
    ("lr_g", -1.0, "a number > 0"),
    ("lr_g", 0.0, "a number > 0"),
    ("lr_d", 0, "a number > 0"),
    ("lr_d", float("nan"), "a number > 0"),
    ("lr_d", float("inf"), "a number > 0"),
    ("batch_size", 0, "an integer >= 1"),
    ("batch_size", -64, "an integer >= 1"),
    ("batch_size", True, "an integer >= 1"),      # bool is an int in Python: must still be refused
    ("batch_size", 64.0, "an integer >= 1"),
    ("epochs", 0, "an integer >= 1"),
    ("epochs", False, "an integer >= 1"),
    ("train_subset", -1, "0 (all 50,000 training images) or a positive integer"),
    ("seed", -3, "an integer from 0 to 2**32-1"),
    ("seed", 2 ** 32, "an integer from 0 to 2**32-1"),  # NumPy's seed is 32 bits
    ("g_loss", "hinge", "'non_saturating' or 'minimax'"),
    ("g_loss", "hinge", "the setting `loss`"),
    ("loss", "wasserstein", "'bce' (the paper's game), 'hinge' or 'least_squares'"),
    ("g_batchnorm", 1, "True or False"),
    ("d_dropout", 1.0, "a number in [0, 1)"),
    ("label_smoothing", 0.5, "a number in [0, 0.5)"),
    ("beta1", 1.0, "a number in [0, 1)"),
    ("beta2", 1.0, "a number in [0, 1)"),
    ("ema_decay", -0.1, "a number in [0, 1)"),
    ("r1_gamma", -1.0, "a number >= 0"),
    ("r1_gamma", float("nan"), "a number >= 0"),
    ("r1_every", 0, "an integer >= 1"),
    ("matmul_precision", "bf16", "'highest', 'high' or 'medium'"),
    ("device", "tpu", "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    ("data_dir", None, "a directory path"),
    ("checkpoint_every", 0, "an integer >= 1"),
    ("d_hidden", [], "a list of hidden-layer widths"),
    ("d_hidden", [512, 0], "a list of hidden-layer widths"),
    ("g_hidden", [256.0, 512], "a list of hidden-layer widths"),
    ("d_hidden", "512, 256", "-p d_hidden '[1024, 512, 256]'"),  # papermill's own -p makes a string of it
])
def test_bad_parameter_is_named_with_allowed_values(defaults, name, value, allowed):
    msg = bad(defaults, **{name: value})
    assert f"{name} = {value!r}" in msg
    assert allowed in msg


def test_every_bad_parameter_is_listed_at_once(defaults):
    msg = bad(defaults, lr_g=-1.0, batch_size=0, g_loss="wasserstein")
    assert "lr_g = -1.0" in msg and "batch_size = 0" in msg and "g_loss = 'wasserstein'" in msg


def test_settings_only_the_bce_game_reads_are_refused_with_another_loss(defaults):
    msg = bad(defaults, loss="hinge", g_loss="minimax", label_smoothing=0.1)
    assert "g_loss = 'minimax' is a loss of the BCE game; loss = 'hinge' has its own" in msg
    assert "label_smoothing = 0.1 has no meaning for the hinge loss" in msg
    assert "label_smoothing" not in bad(defaults, loss="least_squares", g_loss="minimax", label_smoothing=0.1)
    for loss in settings.LOSSES:  # each game with the settings it reads
        settings.validate_parameters({**defaults, "loss": loss, "label_smoothing": 0.1 if loss != "hinge" else 0.0})


@pytest.mark.parametrize("typo, meant", [("lr_gg", "lr_g"), ("epoch", "epochs"), ("batchsize", "batch_size")])
def test_unknown_parameter_did_you_mean(defaults, typo, meant):
    msg = bad(defaults, **{typo: 1})
    assert f"unknown parameter {typo!r}" in msg
    assert f"did you mean {meant!r}" in msg


@pytest.mark.parametrize("name", sorted(settings.RETIRED_PARAMETERS))
def test_retired_parameter_says_why_it_went(defaults, name):
    msg = bad(defaults, **{name: 0.9})
    assert f"{name} is no longer a parameter: {settings.RETIRED_PARAMETERS[name]}; drop it" in msg


def test_retired_settings_of_an_old_checkpoint(defaults):
    old = {**defaults, "amp": True, "compile": False, "beta1_g": 0.5, "beta1_d": 0.9, "beta2_g": 0.999, "beta2_d": 0.99}
    notes = settings.retired_settings(old, defaults)  # defaults: beta1 = 0.5, beta2 = 0.999
    assert len(notes) == 3  # amp, beta1_d and beta2_d differ from what training now does
    assert "amp = True" in notes[0] and "continues with False" in notes[0]
    assert any("beta1_d = 0.9" in n and "continues with 0.5" in n for n in notes)
    assert any("beta2_d = 0.99" in n and "continues with 0.999" in n for n in notes)
    assert settings.retired_settings(defaults, defaults) == []  # a checkpoint of this version


def test_a_checkpoint_from_before_the_beta2_setting_is_told_what_it_trained_with(defaults):
    old = {k: v for k, v in defaults.items() if k != "beta2"}  # Adam's beta2 was a fixed 0.999 then
    assert settings.retired_settings(old, defaults) == []  # continuing as it trained (the default): nothing to say
    (note,) = settings.retired_settings(old, {**defaults, "beta2": 0.99})
    assert "predates the beta2 setting" in note and "beta2 = 0.999" in note and "continues with beta2 = 0.99" in note


def test_unknown_parameter_without_close_match(defaults):
    msg = bad(defaults, zzzzzz=1)
    assert "unknown parameter 'zzzzzz'" in msg and "did you mean" not in msg


def test_missing_resume_file(defaults, tmp_path):
    missing = tmp_path / "no_such_run" / "checkpoint.pt"
    msg = bad(defaults, resume=str(missing))
    assert "resume" in msg and str(missing) in msg and "no such file" in msg


def test_existing_resume_file_passes(defaults, tmp_path):
    path = runs.save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1})
    settings.validate_parameters({**defaults, "resume": str(path)})


def test_a_parameter_typed_in_the_wrong_case_in_a_new_cell_is_refused_not_ignored(defaults):
    namespace = {**defaults, "lr_D": 1e-4, "Epochs": 80, "G": torch.nn.Linear(1, 1), "_lr_d": 0.1}
    assert settings.misspelt_parameters(namespace) == {"lr_D": 1e-4, "Epochs": 80}
    with pytest.raises(errors.ParameterError) as info:
        settings.validate_parameters({**defaults, **settings.misspelt_parameters(namespace)})
    msg = str(info.value)
    assert "unknown parameter 'lr_D' (did you mean 'lr_d'?)" in msg  # not lr_g, as close by spelling
    assert "unknown parameter 'Epochs' (did you mean 'epochs'?)" in msg


def test_settings_the_setup_cells_used_cannot_change_in_the_training_cell(defaults):
    settings.check_setup_unchanged(defaults, {**defaults, "epochs": 80, "lr_g": 1e-4})  # the training cell applies these
    with pytest.raises(errors.ParameterError) as info:
        settings.check_setup_unchanged(defaults, {**defaults, "train_subset": 2000, "device": "cuda"})
    msg = str(info.value)
    assert "train_subset: 0 -> 2000; device: 'auto' -> 'cuda'" in msg and "restart the kernel" in msg


def test_check_checkpoint_fits_lists_every_difference():
    shapes = {"g_hidden": [256, 512, 1024], "d_hidden": [512, 256]}
    saved = {"latent_dim": 100, "g_batchnorm": True, "lr_g": 2e-4, **shapes}
    settings.check_checkpoint_fits(saved, {"latent_dim": 100, "g_batchnorm": True, "lr_g": 1e-3, **shapes})  # lr may change
    with pytest.raises(errors.CheckpointError) as info:
        settings.check_checkpoint_fits(saved, {"latent_dim": 64, "g_batchnorm": False, "lr_g": 2e-4,
                                         "g_hidden": [256, 512, 1024], "d_hidden": [256]})
    msg = str(info.value)
    assert "latent_dim: checkpoint has 100, notebook has 64" in msg
    assert "g_batchnorm: checkpoint has True, notebook has False" in msg
    assert "d_hidden: checkpoint has [512, 256], notebook has [256]" in msg
    assert "lr_g" not in msg and "g_hidden" not in msg


def test_the_moving_average_of_g_may_change_its_decay_but_not_go_on_or_off():
    saved = {"latent_dim": 100, "g_batchnorm": True, "g_hidden": [256, 512, 1024], "d_hidden": [512, 256],
             "ema_decay": 0.999}
    settings.check_checkpoint_fits(saved, {**saved, "ema_decay": 0.9995})
    with pytest.raises(errors.CheckpointError, match=r"ema_decay: checkpoint has 0.999, notebook has 0 "):
        settings.check_checkpoint_fits(saved, {**saved, "ema_decay": 0})
    with pytest.raises(errors.CheckpointError, match=r"ema_decay: checkpoint has 0, notebook has 0.999 .*new run"):
        settings.check_checkpoint_fits({**saved, "ema_decay": 0}, saved)


def test_a_checkpoint_of_the_other_notebook_is_named_as_such():
    vanilla = {"latent_dim": 100, "g_batchnorm": True, "g_hidden": [256, 512, 1024], "d_hidden": [512, 256]}
    dcgan = {"latent_dim": 100, "image_size": 32, "g_width": 32, "d_width": 32}
    with pytest.raises(errors.CheckpointError, match=r"^this is a checkpoint of DCGAN\.ipynb, not of "
                                                         r"Vanilla_GAN\.ipynb: resume it with DCGAN\.ipynb"):
        settings.check_checkpoint_fits(dcgan, vanilla)
    with pytest.raises(errors.CheckpointError, match=r"checkpoint of Vanilla_GAN\.ipynb, not of DCGAN\.ipynb"):
        settings.check_checkpoint_fits(vanilla, dcgan)


def test_a_checkpoint_from_before_the_width_settings_has_the_old_shapes():
    # Made when D was fixed at 1024-512-256 (no g_hidden / d_hidden in its config): it resumes with
    # d_hidden set to that, and the message for the new default says what to set.
    old = {"latent_dim": 100, "g_batchnorm": True}
    now = {"latent_dim": 100, "g_batchnorm": True, "g_hidden": (256, 512, 1024)}  # tuples compare as lists
    settings.check_checkpoint_fits(old, {**now, "d_hidden": [1024, 512, 256]})
    with pytest.raises(errors.CheckpointError) as info:
        settings.check_checkpoint_fits(old, {**now, "d_hidden": [512, 256]})
    assert ("d_hidden: checkpoint has [1024, 512, 256], notebook has [512, 256] (the checkpoint predates "
            "this setting)") in str(info.value)


def test_settings_changed_counts_a_later_setting_as_what_the_checkpoint_trained_with(defaults):
    old = {k: v for k, v in defaults.items() if k != "beta2"}  # from before beta2 was a setting
    assert settings.settings_changed(old, defaults) == {}  # it trained with 0.999, the default now
    assert settings.settings_changed(old, {**defaults, "beta2": 0.99, "lr_d": 1e-3}) == {
        "beta2": (0.999, 0.99), "lr_d": (defaults["lr_d"], 1e-3)}
    # a resume always changes where the run reads and writes: not news worth printing
    moved = {**defaults, "resume": "runs/x/checkpoint.pt", "run_dir": "runs/y", "overwrite": True, "epochs": 80}
    assert settings.settings_changed(defaults, moved) == {"epochs": (defaults["epochs"], 80)}


def test_the_default_networks_are_the_same_on_every_device_and_cpu(monkeypatch):
    # Only how a step is computed may adapt to the machine (precision, layout, threads), never what it
    # computes: the networks built from either notebook's defaults have the same shapes whatever the CPU
    # reports, and on any device (a GPU's stand-in here is the meta device: shapes only).
    from gan import dcgan, hardware
    mlp, conv = method.notebook_parameters(), dcgan.notebook_parameters()
    assert all(mlp[k] != "auto" for k in settings.ARCHITECTURE_KEYS)
    assert all(conv[k] != "auto" for k in settings.DCGAN_ARCHITECTURE_KEYS)

    def shapes(parts):
        return {name: {k: tuple(v.shape) for k, v in net.state_dict().items()}
                for name, net in parts.items() if isinstance(net, torch.nn.Module)}

    def built(device):
        return (shapes(method.build_training_parts(mlp, device)),
                shapes(dcgan.build_training_parts(conv, device, 3)))

    by_cpu = {}
    for cpu, speedup in (("Intel Xeon (AMX)", 2.6), ("AMD EPYC (AVX2 only)", 0.9)):
        monkeypatch.setattr(hardware, "cpu_description", lambda *a, cpu=cpu, **k: cpu)
        monkeypatch.setattr(hardware, "medium_precision_speedup", lambda *a, speedup=speedup, **k: speedup)
        by_cpu[cpu] = built("cpu")
    first, second = by_cpu.values()
    assert first == second
    assert built("meta") == first
    widths = [shape[0] for k, shape in first[0]["D"].items() if k.endswith("weight")]
    assert widths == [768, 384, 192, 1]


def test_auto_precision_is_an_allowed_value_and_a_typo_is_refused():
    settings.validate_parameters({"matmul_precision": "auto", "cuda_graphs": True})
    with pytest.raises(errors.ParameterError, match=r"d_hidden = 'auto'.*\[768, 384, 192\] \(the default, on every machine\)"):
        settings.validate_parameters({"d_hidden": "auto"})  # the networks never depend on the machine
    with pytest.raises(errors.ParameterError, match="matmul_precision.*'auto'"):
        settings.validate_parameters({"matmul_precision": "bf16"})
    with pytest.raises(errors.ParameterError, match="cuda_graphs"):
        settings.validate_parameters({"cuda_graphs": "yes"})


# ------------------------------------------------------------------------------------------------
# -p values typed by the rules; a resume keeps the run's own settings; sizes the memory can hold
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, text, value", [
    ("run_dir", "2024_12_01", "2024_12_01"),  # int() would read 20241201
    ("run_dir", "007", "007"),
    ("resume", "123", "123"),
    ("data_dir", "1e3", "1e3"),
    ("epochs", "5", 5),
    ("lr_g", "1e-4", 1e-4),
    ("g_batchnorm", "False", False),
    ("d_hidden", "[512, 256]", [512, 256]),
    ("d_hidden", "auto", "auto"),  # left as text: validate_parameters refuses it
    ("d_hidden", "[512, 256", "[512, 256"),  # left as text: validate_parameters names it
    ("overwrite", "1", 1),  # allowed neither way: left for validate_parameters to name
])
def test_command_line_values_are_typed_by_their_rule(name, text, value):
    typed = settings.typed_parameter(name, text)
    assert typed == value and type(typed) is type(value)


def test_a_folder_named_like_a_number_stays_a_path_for_dcgan():
    assert settings.typed_parameter("dataset", "2024", settings.DCGAN_PARAMETER_RULES) == "2024"
    assert settings.typed_parameter("image_size", "64", settings.DCGAN_PARAMETER_RULES) == 64
    assert settings.rules_for("some/dir/DCGAN.ipynb") is settings.DCGAN_PARAMETER_RULES
    assert settings.rules_for("Vanilla_GAN.ipynb") is settings.PARAMETER_RULES


RESUME = __file__  # any existing file: validate_parameters checks that `resume` names one


def resumed_with(namespace_changes: dict, checkpoint_changes: dict, injected: str = "",
                 rules=settings.PARAMETER_RULES):
    """settings.resumed for the notebook's defaults with `namespace_changes` (as the parameters cell or a
    `-p` left them), a checkpoint made with `checkpoint_changes`, and papermill's injected cell `injected`."""
    defaults = settings.notebook_defaults(rules)
    config = {**defaults, **namespace_changes}
    namespace = {**config, "In": [injected] if injected else []}
    checkpoint_config = {**defaults, **checkpoint_changes}
    if rules is settings.PARAMETER_RULES:
        checkpoint_config["d_hidden"] = [1024, 512, 256]  # a run made with other widths than today's default
    return settings.resumed(config, checkpoint_config, namespace, rules)


def test_a_resume_continues_with_the_runs_own_settings():
    config, note = resumed_with({"resume": RESUME}, {"lr_g": 1e-4, "train_subset": 512, "epochs": 3},
                                injected=f"# Parameters\nresume = {RESUME!r}\n")
    assert (config["lr_g"], config["train_subset"], config["epochs"]) == (1e-4, 512, 3)
    assert config["d_hidden"] == [1024, 512, 256]  # the checkpoint's networks, not the default's
    assert note == "with the run's own settings"


def test_only_the_settings_passed_for_the_resume_replace_the_runs_own():
    config, note = resumed_with({"resume": RESUME, "epochs": 8, "device": "cpu"},
                                {"lr_g": 1e-4, "epochs": 3, "device": "auto"},
                                injected=f"# Parameters\nresume = {RESUME!r}\nepochs = 8\ndevice = 'cpu'\n")
    assert (config["lr_g"], config["epochs"], config["device"]) == (1e-4, 8, "cpu")
    assert note == "with the run's own settings, except those set for this run: epochs 3 -> 8"  # not the device


def test_in_jupyter_a_value_edited_in_the_parameters_cell_counts_as_set():
    config, note = resumed_with({"resume": RESUME, "lr_d": 2e-4}, {"lr_g": 1e-4, "lr_d": 6e-4})
    assert (config["lr_g"], config["lr_d"]) == (1e-4, 2e-4)
    assert "lr_d 0.0006 -> 0.0002" in note


def test_where_and_how_a_run_computes_is_always_as_set_now(tmp_path):
    config, _ = resumed_with({"resume": RESUME}, {"data_dir": "/elsewhere", "matmul_precision": "medium",
                                                             "run_dir": "old", "overwrite": True})
    defaults = settings.notebook_defaults()
    assert all(config[k] == defaults[k] for k in ("data_dir", "matmul_precision", "run_dir", "overwrite"))


def test_a_dcgan_resume_keeps_its_dataset():
    config, _ = resumed_with({"resume": RESUME}, {"dataset": "my_faces", "image_size": 64},
                             rules=settings.DCGAN_PARAMETER_RULES)
    assert (config["dataset"], config["image_size"]) == ("my_faces", 64)


def test_a_resume_from_the_other_notebooks_checkpoint_is_named_as_such():
    with pytest.raises(errors.CheckpointError, match="checkpoint of Vanilla_GAN.ipynb, not of DCGAN.ipynb"):
        dcgan = settings.DCGAN_PARAMETER_RULES
        settings.resumed(settings.notebook_defaults(dcgan), settings.notebook_defaults(), {}, dcgan)


@pytest.mark.parametrize("name, value, says", [
    ("eval_samples", 10 ** 9, "eval_samples = 1,000,000,000 needs about"),
    ("metrics_samples", 10 ** 8, "metrics_samples = 100,000,000 needs about"),
    ("g_hidden", [256, 10 ** 9], "make networks of"),
    ("latent_dim", 10 ** 9, "make networks of"),
])
def test_sizes_beyond_the_machines_memory_are_refused_before_any_work(defaults, name, value, says):
    with pytest.raises(errors.ParameterError) as info:
        settings.validate_memory({**defaults, name: value}, memory=16 * 2 ** 30)
    assert says in str(info.value) and "16.0 GiB" in str(info.value)


def test_the_memory_bound_says_the_largest_count_that_fits(defaults):
    memory = 2 ** 30  # 1 GiB: half of it holds 512 MiB / (784 pixels * 12 bytes) samples
    most = int(memory * settings.MEMORY_SHARE // (784 * settings.BYTES_PER_SAMPLE_PIXEL))
    settings.validate_memory({**defaults, "eval_samples": most}, memory=memory)
    with pytest.raises(errors.ParameterError, match=f"use at most {most:,}"):
        settings.validate_memory({**defaults, "eval_samples": most + 1}, memory=memory)


def test_defaults_of_both_notebooks_fit_a_small_laptop(defaults):
    settings.validate_memory(defaults, memory=4 * 2 ** 30)
    dcgan = settings.notebook_defaults(settings.DCGAN_PARAMETER_RULES)
    settings.validate_memory({**dcgan, "image_size": 64}, settings.DCGAN_PARAMETER_RULES, memory=4 * 2 ** 30)


def test_checked_refuses_a_size_too_large_for_the_memory(defaults):
    with pytest.raises(errors.ParameterError, match="too large for this machine's memory"):
        settings.checked({**defaults, "eval_samples": 10 ** 12})


@pytest.mark.parametrize("minutes, seconds, fits", [
    (0, 1000.0, 25),   # 0: no limit
    (25, 59.0, 25),    # 25 epochs of 59 s fit in 25 min
    (25, 110.0, 13),   # an AVX2-only laptop: 13 epochs of 110 s
    (1, 3600.0, 1),    # never fewer than the epoch already trained
])
def test_the_epochs_that_fit_in_train_minutes(minutes, seconds, fits):
    epochs, note = settings.epochs_that_fit(25, minutes, seconds)
    assert epochs == fits
    if fits == 25:
        assert note is None
    else:  # says what it did, why, and how to train them all
        assert f"training {fits} of the 25 epochs" in note and f"{seconds:.0f} s" in note
        assert "train_minutes = 0" in note and "-p epochs 25" in note
