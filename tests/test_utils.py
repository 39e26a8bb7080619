"""gan_utils and run_safety's checkpoints and atomic writes: parameters, device, seeding, grids and
GIFs, latent walks, EMA, export, the metrics log, and the notebook's own networks/losses."""

from __future__ import annotations

import copy
import math
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gan_utils as gu
import run_safety
from conftest import NOTEBOOK


@pytest.fixture(scope="module")
def defaults() -> dict:
    """The notebook's default parameters, read from its `parameters` cell."""
    return gu.parameters_from(gu.notebook_defaults(NOTEBOOK))


@pytest.fixture(scope="module")
def nb():
    """The notebook's networks, losses and training step (cells tagged gan-core)."""
    return gu.load_notebook_definitions(NOTEBOOK)


def bad(defaults, **changes):
    """The ParameterError message for the defaults with `changes`."""
    with pytest.raises(gu.ParameterError) as info:
        gu.validate_parameters({**defaults, **changes})
    return str(info.value)


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------

def test_defaults_are_valid(defaults):
    assert set(defaults) == set(gu.PARAMETER_RULES)
    gu.validate_parameters(defaults)  # no exception


def test_parameters_from_names_a_missing_parameter(defaults):
    namespace = dict(defaults)
    del namespace["lr_d"]
    with pytest.raises(gu.ParameterError, match="lr_d"):
        gu.parameters_from(namespace)


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


@pytest.mark.parametrize("typo, meant", [("lr_gg", "lr_g"), ("epoch", "epochs"), ("batchsize", "batch_size")])
def test_unknown_parameter_did_you_mean(defaults, typo, meant):
    msg = bad(defaults, **{typo: 1})
    assert f"unknown parameter {typo!r}" in msg
    assert f"did you mean {meant!r}" in msg


@pytest.mark.parametrize("name", sorted(gu.RETIRED_PARAMETERS))
def test_retired_parameter_says_why_it_went(defaults, name):
    msg = bad(defaults, **{name: 0.9})
    assert f"{name} is no longer a parameter: {gu.RETIRED_PARAMETERS[name]}; drop it" in msg


def test_retired_settings_of_an_old_checkpoint(defaults):
    old = {**defaults, "amp": True, "compile": False, "beta1_g": 0.5, "beta1_d": 0.9, "beta2_g": 0.999, "beta2_d": 0.99}
    notes = gu.retired_settings(old, defaults)  # defaults: beta1 = 0.5, beta2 = 0.999
    assert len(notes) == 3  # amp, beta1_d and beta2_d differ from what training now does
    assert "amp = True" in notes[0] and "continues with False" in notes[0]
    assert any("beta1_d = 0.9" in n and "continues with 0.5" in n for n in notes)
    assert any("beta2_d = 0.99" in n and "continues with 0.999" in n for n in notes)
    assert gu.retired_settings(defaults, defaults) == []  # a checkpoint of this version


def test_a_checkpoint_from_before_the_beta2_setting_is_told_what_it_trained_with(defaults):
    old = {k: v for k, v in defaults.items() if k != "beta2"}  # Adam's beta2 was a fixed 0.999 then
    assert gu.retired_settings(old, defaults) == []  # continuing as it trained (the default): nothing to say
    (note,) = gu.retired_settings(old, {**defaults, "beta2": 0.99})
    assert "predates the beta2 setting" in note and "beta2 = 0.999" in note and "continues with beta2 = 0.99" in note


def test_unknown_parameter_without_close_match(defaults):
    msg = bad(defaults, zzzzzz=1)
    assert "unknown parameter 'zzzzzz'" in msg and "did you mean" not in msg


def test_missing_resume_file(defaults, tmp_path):
    missing = tmp_path / "no_such_run" / "checkpoint.pt"
    msg = bad(defaults, resume=str(missing))
    assert "resume" in msg and str(missing) in msg and "no such file" in msg


def test_existing_resume_file_passes(defaults, tmp_path):
    path = run_safety.save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1})
    gu.validate_parameters({**defaults, "resume": str(path)})


# ------------------------------------------------------------------------------------------------
# Run directory and device
# ------------------------------------------------------------------------------------------------

def test_claim_run_dir_creates_grids(tmp_path):
    lock = run_safety.claim_run_dir(str(tmp_path / "a" / "b"))
    path = tmp_path / "a" / "b"
    assert lock.run_dir == path and (path / "grids").is_dir()
    lock.release()


def test_resolve_run_dir_default_is_dated(tmp_path):
    path = run_safety.resolve_run_dir("", root=str(tmp_path / "runs"))
    assert path.parent == tmp_path / "runs" and not path.exists()  # resolving writes nothing
    assert len(path.name) == len("2024-01-01_00-00-00")


def test_claim_run_dir_unwritable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file, so nothing can be created below it (even as root)")
    target = blocker / "run"
    with pytest.raises(gu.ParameterError) as info:
        run_safety.claim_run_dir(str(target))
    assert "run_dir" in str(info.value) and str(target) in str(info.value)


def test_pick_device_cpu():
    assert gu.pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("requested", ["cuda", "cuda:1"])
def test_pick_device_cuda_without_gpu(monkeypatch, requested):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(gu.ParameterError) as info:
        gu.pick_device(requested)
    assert requested in str(info.value) and "'cpu'" in str(info.value)


def test_pick_device_auto_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert gu.pick_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_pick_device_cuda_really_absent():
    with pytest.raises(gu.ParameterError):
        gu.pick_device("cuda")


# ------------------------------------------------------------------------------------------------
# Seeding
# ------------------------------------------------------------------------------------------------

def test_seed_everything_repeats():
    draws = []
    for _ in range(2):
        gu.seed_everything(42)
        draws.append((torch.randn(5), np.random.rand(3), random.random()))
    assert torch.equal(draws[0][0], draws[1][0])
    assert np.array_equal(draws[0][1], draws[1][1])
    assert draws[0][2] == draws[1][2]
    gu.seed_everything(43)
    assert not torch.equal(torch.randn(5), draws[0][0])


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(5)
    state = gu.rng_state()
    a = torch.randn(10)
    torch.randn(100)  # move on
    gu.set_rng_state(state)
    assert torch.equal(torch.randn(10), a)
    # and through a checkpoint file
    run_safety.save_checkpoint(tmp_path / "c.pt", {"rng": state})
    torch.randn(7)
    gu.set_rng_state(run_safety.load_checkpoint(tmp_path / "c.pt", required_keys=("rng",))["rng"])
    assert torch.equal(torch.randn(10), a)


def test_epoch_summary_with_and_without_the_classifier_score():
    row = {"epoch": 3, "d_loss": 1.3, "g_loss": 0.8, "d_x": 0.53, "d_g_z": 0.47, "train_seconds": 27.4}
    assert gu.epoch_summary(row) == "epoch   3  D loss 1.300  G loss 0.800  D(x) 0.53  D(G(z)) 0.47  [27 s]"
    assert gu.epoch_summary({**row, "fd": 1.234, "score": 8.9}).endswith("FD 1.23  score 8.90  [27 s]")
    # a folder of faces: Frechet distance on the classifier's features, but no classes to score
    assert gu.epoch_summary({**row, "fd": 12.5}).endswith("0.47  FD 12.50  [27 s]")


def test_any_error_in_an_epoch_rolls_back_to_the_last_good_epoch(tmp_path, capsys):
    rolled = []
    with pytest.raises(OSError, match="No space left"):
        with gu.rolled_back_when_stopped(lambda: rolled.append(3) or 3, tmp_path / "checkpoint.pt"):
            raise OSError(28, "No space left on device")
    assert rolled == [3] and "OSError in epoch 4: that epoch was rolled back" in capsys.readouterr().out

    def fails_too():
        raise OSError(28, "still full")

    with pytest.raises(MemoryError):  # the first error is the one that surfaces
        with gu.rolled_back_when_stopped(fails_too, tmp_path / "checkpoint.pt"):
            raise MemoryError()
    assert "rolling back after MemoryError failed too (OSError" in capsys.readouterr().out


def test_training_after_a_restore_leaves_the_restored_state_as_it_was():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(8, 4)).sum().backward()
    opt.step()
    parts = {"net": net, "opt": opt}
    state = gu.snapshot({}, 1, parts, torch.zeros(1), [{"epoch": 1}])
    first = copy.deepcopy(state)
    history, epoch = gu.restore_training_state(state, parts)
    assert (history, epoch) == ([{"epoch": 1}], 1)
    history.append({"epoch": 2})  # the notebook trains on: its history and Adam's moments change
    opt.zero_grad()
    net(torch.randn(8, 4)).sum().backward()
    opt.step()
    assert state["history"] == [{"epoch": 1}]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state["opt"]["state"][0][key], first["opt"]["state"][0][key])


def test_a_parameter_typed_in_the_wrong_case_in_a_new_cell_is_refused_not_ignored(defaults):
    namespace = {**defaults, "lr_D": 1e-4, "Epochs": 80, "G": torch.nn.Linear(1, 1), "_lr_d": 0.1}
    assert gu.misspelt_parameters(namespace) == {"lr_D": 1e-4, "Epochs": 80}
    with pytest.raises(gu.ParameterError) as info:
        gu.validate_parameters({**defaults, **gu.misspelt_parameters(namespace)})
    msg = str(info.value)
    assert "unknown parameter 'lr_D' (did you mean 'lr_d'?)" in msg  # not lr_g, as close by spelling
    assert "unknown parameter 'Epochs' (did you mean 'epochs'?)" in msg


def test_settings_the_setup_cells_used_cannot_change_in_the_training_cell(defaults):
    gu.check_setup_unchanged(defaults, {**defaults, "epochs": 80, "lr_g": 1e-4})  # the training cell applies these
    with pytest.raises(gu.ParameterError) as info:
        gu.check_setup_unchanged(defaults, {**defaults, "train_subset": 2000, "device": "cuda"})
    msg = str(info.value)
    assert "train_subset: 0 -> 2000; device: 'auto' -> 'cuda'" in msg and "restart the kernel" in msg


class _OnTheGpu:
    """Stands in for a state tensor that load_checkpoint(map_location=<GPU>) put on the GPU, which
    torch.set_rng_state refuses: only .cpu() gives the tensor back."""

    def __init__(self, tensor):
        self._tensor = tensor

    def cpu(self):
        return self._tensor


def test_rng_state_of_a_checkpoint_loaded_onto_the_gpu_is_restored_on_the_gpus_there_are(monkeypatch):
    torch.manual_seed(5)
    state = gu.rng_state()
    a = torch.randn(10)
    cuda_states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5, 6], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # saved on a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    gu.set_rng_state({"cpu": _OnTheGpu(state["cpu"]), "cuda": [_OnTheGpu(s) for s in cuda_states]})
    assert torch.equal(torch.randn(10), a)
    assert restored == [(cuda_states[0], 0)]  # the one GPU here; the other's state has no device


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def sample_checkpoint():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    return {
        "config": {"latent_dim": 100, "g_batchnorm": True, "lr_g": 2e-4, "g_loss": "non_saturating",
                   "resume": ""},
        "epoch": 3,
        "G": model.state_dict(),
        "D": model.state_dict(),
        "G_ema": model.state_dict(),
        "opt_G": opt.state_dict(),
        "opt_D": opt.state_dict(),
        "fixed_noise": torch.randn(64, 100),
        "rng": gu.rng_state(),
        "nested": {"a": {"b": [torch.arange(3), 1.5, None, "text"]}},
        "history": [{"epoch": 1, "d_loss": 1.2, "g_loss": 0.8}, {"epoch": 2, "d_loss": 1.1, "g_loss": float("nan")}],
    }


def assert_same(a, b, where="checkpoint"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


def test_checkpoint_round_trip(tmp_path):
    original = sample_checkpoint()
    path = run_safety.save_checkpoint(tmp_path / "checkpoint.pt", copy.deepcopy(original))
    assert path == tmp_path / "checkpoint.pt"
    loaded = run_safety.load_checkpoint(path)
    assert loaded["format"] == run_safety.CHECKPOINT_FORMAT
    del loaded["format"]
    assert_same(original, loaded)
    # it really is weights_only-loadable, without gan_utils
    assert torch.load(path, weights_only=True)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_checkpoint_state_dicts_load_into_modules(tmp_path):
    original = sample_checkpoint()
    run_safety.save_checkpoint(tmp_path / "c.pt", original)
    loaded = run_safety.load_checkpoint(tmp_path / "c.pt")
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model.load_state_dict(loaded["G"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.load_state_dict(loaded["opt_G"])
    assert opt.state_dict()["state"][0]["step"].item() == 1


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(run_safety.CheckpointError, match="no such checkpoint"):
        run_safety.load_checkpoint(tmp_path / "nothing.pt")


def test_load_checkpoint_not_a_torch_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(run_safety.CheckpointError) as info:
        run_safety.load_checkpoint(path)
    assert str(path) in str(info.value) and "not a readable checkpoint" in str(info.value)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.99])
def test_load_checkpoint_truncated(tmp_path, fraction):
    path = run_safety.save_checkpoint(tmp_path / "checkpoint.pt", sample_checkpoint())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(run_safety.CheckpointError) as info:
        run_safety.load_checkpoint(path)
    assert str(path) in str(info.value) and "checkpoint" in str(info.value)


def test_load_checkpoint_without_format_tag(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"epoch": 3, "G": {}}, path)
    with pytest.raises(run_safety.CheckpointError) as info:
        run_safety.load_checkpoint(path)
    assert "format tag" in str(info.value) and run_safety.CHECKPOINT_FORMAT in str(info.value)
    torch.save(torch.zeros(3), path)  # not even a dict
    with pytest.raises(run_safety.CheckpointError, match="format tag"):
        run_safety.load_checkpoint(path)


class RunsCode:
    """Unpickling this calls os.system: the classic malicious pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_load_checkpoint_never_runs_code(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    payload = {"format": run_safety.CHECKPOINT_FORMAT, "epoch": 1, "G": RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(run_safety.CheckpointError) as info:
        run_safety.load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert str(path) in str(info.value)
    # control: the payload is live (an unrestricted unpickler does run it), so the check above means something
    if how == "pickle":
        pickle.loads(path.read_bytes())
        assert marker.exists()


def test_check_checkpoint_fits_lists_every_difference():
    shapes = {"g_hidden": [256, 512, 1024], "d_hidden": [512, 256]}
    saved = {"latent_dim": 100, "g_batchnorm": True, "lr_g": 2e-4, **shapes}
    run_safety.check_checkpoint_fits(saved, {"latent_dim": 100, "g_batchnorm": True, "lr_g": 1e-3, **shapes})  # lr may change
    with pytest.raises(run_safety.CheckpointError) as info:
        run_safety.check_checkpoint_fits(saved, {"latent_dim": 64, "g_batchnorm": False, "lr_g": 2e-4,
                                         "g_hidden": [256, 512, 1024], "d_hidden": [256]})
    msg = str(info.value)
    assert "latent_dim: checkpoint has 100, notebook has 64" in msg
    assert "g_batchnorm: checkpoint has True, notebook has False" in msg
    assert "d_hidden: checkpoint has [512, 256], notebook has [256]" in msg
    assert "lr_g" not in msg and "g_hidden" not in msg


def test_the_moving_average_of_g_may_change_its_decay_but_not_go_on_or_off():
    saved = {"latent_dim": 100, "g_batchnorm": True, "g_hidden": [256, 512, 1024], "d_hidden": [512, 256],
             "ema_decay": 0.999}
    run_safety.check_checkpoint_fits(saved, {**saved, "ema_decay": 0.9995})
    with pytest.raises(run_safety.CheckpointError, match=r"ema_decay: checkpoint has 0.999, notebook has 0 "):
        run_safety.check_checkpoint_fits(saved, {**saved, "ema_decay": 0})
    with pytest.raises(run_safety.CheckpointError, match=r"ema_decay: checkpoint has 0, notebook has 0.999 .*new run"):
        run_safety.check_checkpoint_fits({**saved, "ema_decay": 0}, saved)


def test_a_checkpoint_of_the_other_notebook_is_named_as_such():
    vanilla = {"latent_dim": 100, "g_batchnorm": True, "g_hidden": [256, 512, 1024], "d_hidden": [512, 256]}
    dcgan = {"latent_dim": 100, "image_size": 32, "g_width": 32, "d_width": 32}
    with pytest.raises(run_safety.CheckpointError, match=r"^this is a checkpoint of DCGAN\.ipynb, not of "
                                                         r"Vanilla_GAN\.ipynb: resume it with DCGAN\.ipynb"):
        run_safety.check_checkpoint_fits(dcgan, vanilla)
    with pytest.raises(run_safety.CheckpointError, match=r"checkpoint of Vanilla_GAN\.ipynb, not of DCGAN\.ipynb"):
        run_safety.check_checkpoint_fits(vanilla, dcgan, keys=("latent_dim", "image_size", "g_width", "d_width"))


def test_a_checkpoint_from_before_the_width_settings_has_the_old_shapes():
    # Made when D was fixed at 1024-512-256 (no g_hidden / d_hidden in its config): it resumes with
    # d_hidden set to that, and the message for the new default says what to set.
    old = {"latent_dim": 100, "g_batchnorm": True}
    now = {"latent_dim": 100, "g_batchnorm": True, "g_hidden": (256, 512, 1024)}  # tuples compare as lists
    run_safety.check_checkpoint_fits(old, {**now, "d_hidden": [1024, 512, 256]})
    with pytest.raises(run_safety.CheckpointError) as info:
        run_safety.check_checkpoint_fits(old, {**now, "d_hidden": [512, 256]})
    assert ("d_hidden: checkpoint has [1024, 512, 256], notebook has [512, 256] (the checkpoint predates "
            "this setting)") in str(info.value)


# ------------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------------

def fail(exc):
    def raiser(*args, **kwargs):
        raise exc
    return raiser


@pytest.mark.parametrize("where, exc", [
    ("replace", OSError(28, "No space left on device")),
    ("fsync", OSError(5, "Input/output error")),
    ("fsync", KeyboardInterrupt()),
])
def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch, where, exc):
    path = tmp_path / "metrics.csv"
    run_safety.atomic_write_bytes(path, b"old contents\n")
    monkeypatch.setattr(gu.os, where, fail(exc))
    with pytest.raises(type(exc)):
        run_safety.atomic_write_bytes(path, b"new contents that never land\n")
    monkeypatch.undo()
    assert path.read_bytes() == b"old contents\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no .tmp left behind


def test_save_checkpoint_failure_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = run_safety.save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1, "w": torch.ones(3)})
    monkeypatch.setattr(gu.os, "replace", fail(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        run_safety.save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    loaded = run_safety.load_checkpoint(path, required_keys=("epoch", "w"))
    assert loaded["epoch"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    assert not list(tmp_path.glob("*.tmp"))


def test_atomic_write_replaces_content(tmp_path):
    path = tmp_path / "f.json"
    gu.write_json(path, {"a": 1})
    gu.write_json(path, {"a": 2, "p": Path("/x")})
    import json
    assert json.loads(path.read_text()) == {"a": 2, "p": "/x"}


# ------------------------------------------------------------------------------------------------
# Grids, GIFs, latent walks
# ------------------------------------------------------------------------------------------------

def test_grid_image_size():
    img = gu.grid_image(torch.zeros(64, 784))  # 8 per row, 2 px padding, scale 2
    assert img.mode == "L"
    assert img.size == ((8 * 30 + 2) * 2, (8 * 30 + 2) * 2)
    assert gu.grid_image(torch.zeros(64, 1, 28, 28), scale=1).size == (242, 242)
    assert gu.grid_image(torch.zeros(20, 784), nrow=10, scale=1).size == (302, 62)


def test_grid_image_pixel_values():
    x = torch.stack([torch.full((784,), -1.0), torch.full((784,), 1.0)])
    img = gu.grid_image(x, nrow=2, scale=1)
    assert img.getpixel((2 + 14, 2 + 14)) == 0       # -1 -> black
    assert img.getpixel((32 + 14, 2 + 14)) == 255    # +1 -> white
    assert img.getpixel((0, 0)) == 255               # white padding


def test_save_grid_writes_png(tmp_path):
    path = tmp_path / "grid.png"
    returned = gu.save_grid(torch.rand(64, 784) * 2 - 1, path)
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (484, 484)
        assert np.array_equal(np.asarray(img.convert("L")), np.asarray(returned))


@pytest.fixture
def three_frames(tmp_path):
    paths = []
    for k, value in enumerate([-1.0, 0.0, 1.0]):  # black, grey, white digits
        paths.append(tmp_path / f"epoch_{k + 1:03d}.png")
        gu.save_grid(torch.full((64, 784), value), paths[-1])
    return paths


def gif_frames(path):
    with Image.open(path) as img:
        frames = []
        for k in range(img.n_frames):
            img.seek(k)
            frames.append((img.convert("L").getpixel((30, 30)), img.info.get("duration")))
        return img.n_frames, frames


def test_save_gif_frames_in_order(tmp_path, three_frames):
    assert gu.save_gif(three_frames, tmp_path / "a.gif") == 3
    n, frames = gif_frames(tmp_path / "a.gif")
    assert n == 3
    assert [v for v, _ in frames] == [0, 128, 255]
    assert frames[-1][1] >= 1500 and frames[0][1] == 200  # the last frame lingers
    gu.save_gif(three_frames[::-1], tmp_path / "b.gif")
    assert [v for v, _ in gif_frames(tmp_path / "b.gif")[1]] == [255, 128, 0]


def test_save_gif_with_labels(tmp_path, three_frames):
    assert gu.save_gif(three_frames, tmp_path / "l.gif", labels=["epoch 1", "epoch 2", "epoch 3"]) == 3
    with Image.open(tmp_path / "l.gif") as img:
        assert img.n_frames == 3 and img.size == (484, 484 + 14)


def test_save_gif_without_frames_writes_nothing(tmp_path):
    # a resumed run with nothing left to train has no new grids: no GIF, no crash
    assert gu.save_gif([], tmp_path / "x.gif") == 0
    assert not (tmp_path / "x.gif").exists()


def test_epoch_grid_paths_numeric_order(tmp_path):
    (tmp_path / "grids").mkdir()
    for e in (10, 2, 1, 100):
        (tmp_path / "grids" / f"epoch_{e:03d}.png").write_bytes(b"")
    assert [p.name for p in run_safety.epoch_grid_paths(tmp_path)] == ["epoch_001.png", "epoch_002.png",
                                                               "epoch_010.png", "epoch_100.png"]


def test_slerp_endpoints_and_norms():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(100, generator=g), 1.3 * torch.randn(100, generator=g)
    path = gu.slerp(z0, z1, 9)
    assert path.shape == (9, 100)
    assert torch.allclose(path[0], z0, atol=1e-5) and torch.allclose(path[-1], z1, atol=1e-5)
    norms = path.norm(dim=1)
    lo, hi = min(z0.norm(), z1.norm()), max(z0.norm(), z1.norm())
    assert ((norms >= lo - 1e-4) & (norms <= hi + 1e-4)).all()
    # unlike a straight line, which dips towards the origin between two near-orthogonal vectors
    assert norms[4] > ((z0 + z1) / 2).norm() * 1.2


def test_slerp_parallel_vectors():
    z = torch.randn(10)
    path = gu.slerp(z, 2 * z, 5)
    assert torch.isfinite(path).all()
    assert torch.allclose(path[0], z) and torch.allclose(path[-1], 2 * z)


# ------------------------------------------------------------------------------------------------
# EMA, learning rate, messages, stopwatch
# ------------------------------------------------------------------------------------------------

def test_float32_matmul_precision_is_set_inside_the_block_and_restored_after_it():
    assert torch.get_float32_matmul_precision() == "highest"
    with gu.float32_matmul_precision("medium"):
        assert torch.get_float32_matmul_precision() == "medium"
    assert torch.get_float32_matmul_precision() == "highest"
    with pytest.raises(KeyboardInterrupt), gu.float32_matmul_precision("high"):
        raise KeyboardInterrupt  # an interrupted epoch must not leave evaluation in reduced precision
    assert torch.get_float32_matmul_precision() == "highest"


def test_medium_matmul_precision_is_close_to_float32():
    # bfloat16 inputs, float32 accumulation: about 3 significant digits, far from garbage.
    a, b = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)), torch.randn(256, 32)
    exact = a @ b
    with gu.float32_matmul_precision("medium"):
        reduced = a @ b
    assert reduced.dtype == torch.float32
    assert (reduced - exact).abs().max() < 0.05 * exact.abs().max()


def test_update_ema_math(nb):
    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(0.0)
        for p in model.parameters():
            p.fill_(1.0)
        model[1].running_mean.fill_(7.0)
    nb["update_ema"](ema, model, weight=0.1)  # weight = 1 - decay: theta_ema moves 10% of the way
    for p in ema.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.1))
    nb["update_ema"](ema, model, weight=torch.tensor(0.1))  # a captured step passes a 0-d tensor
    for p in ema.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.19))
    assert ema[1].running_mean.item() == 7.0  # buffers are copied, not averaged
    for p in model.parameters():
        assert torch.equal(p, torch.ones_like(p))  # the source is untouched


def test_recalibrate_batchnorm_matches_the_noise_statistics(nb):
    torch.manual_seed(0)
    G = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.BatchNorm1d(3), torch.nn.Tanh())
    G[1].running_mean.fill_(5.0)  # stale statistics, as copied from another model's weights
    G[1].running_var.fill_(9.0)
    global_state = torch.get_rng_state()
    assert nb["recalibrate_batchnorm"](G, latent_dim=4, batches=4, batch_size=250, seed=3) is G
    assert not G.training
    assert torch.equal(torch.get_rng_state(), global_state)  # training's random stream untouched
    # Known answer: the statistics of the pre-BatchNorm activations over exactly that noise.
    rng = torch.Generator().manual_seed(3)
    with torch.no_grad():
        h = torch.stack([G[0](torch.randn(250, 4, generator=rng)) for _ in range(4)])  # (batch, row, unit)
    assert torch.allclose(G[1].running_mean, h.mean((0, 1)), atol=1e-6)
    assert torch.allclose(G[1].running_var, h.var(1).mean(0), atol=1e-6)  # each batch's unbiased variance, averaged


def test_recalibrate_batchnorm_leaves_models_without_batchnorm_alone(nb):
    G = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    before = copy.deepcopy(G.state_dict())
    nb["recalibrate_batchnorm"](G, latent_dim=4)
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items()) and not G.training


def test_ema_decay_warms_up_towards_the_setting(nb):
    assert nb["ema_decay_at"](0, 0.999) == pytest.approx(0.1)
    assert nb["ema_decay_at"](90, 0.999) == pytest.approx(91 / 100)
    assert nb["ema_decay_at"](10 ** 6, 0.999) == 0.999


def test_divergence_and_resume_messages():
    config = {"lr_d": 0.5, "lr_g": 0.25, "beta1": 0.5, "batch_size": 64, "g_loss": "minimax"}
    msg = gu.divergence_message(7, 2, config, Path("/runs/x/checkpoint.pt"))
    assert "lr_d" in msg and "0.5" in msg and "lr_g" in msg and "0.25" in msg
    assert "epoch 3" in msg and "/runs/x/checkpoint.pt" in msg and "resume" in msg
    msg = run_safety.resume_message(Path("/runs/x/checkpoint.pt"), 4)
    assert "resume" in msg and "/runs/x/checkpoint.pt" in msg and "epoch 4" in msg


def test_stopwatch_accumulates():
    clock = gu.Stopwatch(10.0)
    assert clock.elapsed() == 10.0
    clock.start()
    clock.stop()
    first = clock.elapsed()
    assert first >= 10.0
    assert clock.elapsed() == first  # stopped: does not advance


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batchnorm", [True, False])
def test_export_generator(tmp_path, nb, batchnorm):
    torch.manual_seed(0)
    G = nb["Generator"](100, batchnorm=batchnorm)
    G.train()(torch.randn(32, 100))  # move BatchNorm's running statistics off their initial values
    path = gu.export_generator(G, 100, tmp_path / "generator.pt2")
    assert path.is_file() and G.training  # exported a copy: the model itself stays in train mode
    exported = torch.export.load(str(path)).module()
    for n in (1, 7):
        z = torch.randn(n, 100)
        out = exported(z)
        assert out.shape == (n, 1, 28, 28)
        assert out.min() >= -1 and out.max() <= 1
        with torch.no_grad():
            assert torch.allclose(out.reshape(n, 784), G.eval()(z), atol=1e-5)
        G.train()


# ------------------------------------------------------------------------------------------------
# Metrics log
# ------------------------------------------------------------------------------------------------

def test_metrics_csv_round_trip(tmp_path):
    history = [{"epoch": 1, "d_loss": 1.25, "g_loss": 0.5, "train_seconds": 3.0},
               {"epoch": 2, "d_loss": 1.0, "g_loss": 0.75, "train_seconds": 6.5, "fd": 12.5}]
    path = tmp_path / "metrics.csv"
    gu.write_metrics_csv(path, history)
    assert path.read_text().splitlines()[0] == "epoch,d_loss,g_loss,train_seconds,fd"
    rows = gu.read_metrics_csv(path)
    assert len(rows) == 2
    assert rows[1] == {"epoch": 2.0, "d_loss": 1.0, "g_loss": 0.75, "train_seconds": 6.5, "fd": 12.5}
    assert math.isnan(rows[0]["fd"])
    assert {k: v for k, v in rows[0].items() if k != "fd"} == history[0]
    # floats survive exactly (repr round trip)
    gu.write_metrics_csv(path, [{"x": 0.1 + 0.2, "y": 1 / 3}])
    assert gu.read_metrics_csv(path) == [{"x": 0.1 + 0.2, "y": 1 / 3}]


# ------------------------------------------------------------------------------------------------
# The notebook's networks and losses
# ------------------------------------------------------------------------------------------------

def test_notebook_definitions_present(nb):
    for name in ("Generator", "Discriminator", "discriminator_loss", "generator_loss", "r1_penalty",
                 "adversarial_update", "r1_step", "ema_decay_at", "update_ema", "step_schedule", "apply_step", "train_step",
                 "recalibrate_batchnorm", "build_training_parts"):
        assert name in nb, name


@pytest.mark.parametrize("batchnorm", [True, False])
def test_generator_shapes(nb, batchnorm):
    torch.manual_seed(0)
    G = nb["Generator"](100, batchnorm=batchnorm)
    for mode in ("train", "eval"):
        getattr(G, mode)()
        with torch.no_grad():
            out = G(torch.randn(6, 100))
        assert out.shape == (6, 784)
        assert out.min() >= -1 and out.max() <= 1
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in G.modules()) == batchnorm
    assert nb["Generator"](16, batchnorm=batchnorm)(torch.randn(3, 16)).shape == (3, 784)


def test_hidden_widths_set_the_layers(nb):
    G = nb["Generator"](16, [32, 64], batchnorm=False)
    D = nb["Discriminator"]([48])
    linear = torch.nn.Linear
    assert [(m.in_features, m.out_features) for m in G.modules() if isinstance(m, linear)] == [(16, 32), (32, 64), (64, 784)]
    assert [(m.in_features, m.out_features) for m in D.modules() if isinstance(m, linear)] == [(784, 48), (48, 1)]
    assert G(torch.randn(3, 16)).shape == (3, 784) and D(G(torch.randn(3, 16))).shape == (3,)


def test_discriminator_shapes(nb):
    torch.manual_seed(0)
    D = nb["Discriminator"](dropout=0.3).eval()
    with torch.no_grad():
        logits = D(torch.rand(6, 784) * 2 - 1)
        assert logits.shape == (6,)
        assert torch.equal(D(torch.zeros(6, 1, 28, 28)), D(torch.zeros(6, 784)))  # images are flattened
    assert (logits.abs() > 0).all()  # raw logits, not probabilities clamped to [0, 1] by a sigmoid


def make_models(nb, batchnorm=True, seed=0):
    torch.manual_seed(seed)
    G, D = nb["Generator"](100, batchnorm=batchnorm), nb["Discriminator"](dropout=0.3)
    opt_G = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    return G, D, opt_G, opt_D


def weights(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module):
    return [not torch.equal(b, p) for b, p in zip(before, module.parameters())]


@pytest.mark.parametrize("g_loss", ["non_saturating", "minimax"])
def test_adversarial_update_updates_both(nb, g_loss):
    G, D, opt_G, opt_D = make_models(nb)
    g0, d0 = weights(G), weights(D)
    real = torch.rand(32, 784) * 2 - 1
    out = nb["adversarial_update"](G, D, opt_G, opt_D, real, 100, g_loss)
    assert out.shape == (5,) and torch.isfinite(out).all()
    loss_d, d_x, d_gz, loss_g, g_updated = out.tolist()
    assert loss_d > 0 and 0 < d_x < 1 and 0 < d_gz < 1 and g_updated == 1.0
    assert (loss_g > 0) if g_loss == "non_saturating" else (loss_g < 0)
    assert all(changed(g0, G)) and all(changed(d0, D))
    assert all(p.requires_grad for p in D.parameters())  # D unfrozen again after G's step


def test_adversarial_update_without_g_update(nb):
    G, D, opt_G, opt_D = make_models(nb)
    g0, d0 = weights(G), weights(D)
    out = nb["adversarial_update"](G, D, opt_G, opt_D, torch.rand(32, 784) * 2 - 1, 100, update_g=False)
    assert torch.isfinite(out).all()
    assert out[3].item() == 0.0 and out[4].item() == 0.0
    assert not any(changed(g0, G))
    assert all(changed(d0, D))


def test_adversarial_update_is_deterministic(nb):
    outs = []
    for _ in range(2):
        G, D, opt_G, opt_D = make_models(nb, seed=3)
        real = torch.linspace(-1, 1, 16 * 784).reshape(16, 784)
        torch.manual_seed(11)
        outs.append((nb["adversarial_update"](G, D, opt_G, opt_D, real, 100), weights(G)))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def recipe(nb, **changes):
    """The notebook's default settings (a smaller latent) with `changes`, and parts built from them."""
    s = {**gu.notebook_defaults(NOTEBOOK), "latent_dim": 16, "d_hidden": [1024, 512, 256], **changes}
    torch.manual_seed(0)
    return nb["build_training_parts"](s, "cpu"), s


def test_train_step_schedule_of_g_r1_and_ema_steps(nb, monkeypatch):
    # d_steps 2: G and its EMA move on every second step; R1 on multiples of r1_every; the EMA's
    # warm-up counts G steps since training began, here in the second epoch of 10-step epochs.
    parts, s = recipe(nb, d_steps=2, r1_every=3)
    calls = []
    monkeypatch.setitem(nb, "r1_step", lambda *args: calls.append("r1"))
    monkeypatch.setitem(nb, "update_ema", lambda ema, G, weight: calls.append(("ema", 1.0 - weight)))
    real = torch.rand(16, 784) * 2 - 1
    for step in range(1, 7):
        calls.append(step)
        stats = nb["train_step"](parts, real, 1, step, 10, s)
        assert stats[4].item() == float(step % 2 == 0)  # 1 when G was updated
    ema = [("ema", pytest.approx(nb["ema_decay_at"](g_steps, s["ema_decay"]), abs=1e-12)) for g_steps in (6, 7, 8)]
    assert calls == [1, 2, ema[0], 3, "r1", 4, ema[1], 5, 6, "r1", ema[2]]


def test_train_step_is_the_update_then_r1_then_ema(nb):
    (a, s), (b, _) = recipe(nb, r1_every=1), recipe(nb, r1_every=1)
    real = torch.rand(16, 784) * 2 - 1
    torch.manual_seed(5)
    nb["train_step"](a, real, 0, 1, 10, s)
    torch.manual_seed(5)
    nb["adversarial_update"](b["G"], b["D"], b["opt_G"], b["opt_D"], real, 16, s["g_loss"], 1.0, True)
    nb["r1_step"](b["D"], b["opt_D"], real, s["r1_gamma"], 1)
    nb["update_ema"](b["G_ema"], b["G"], 1.0 - nb["ema_decay_at"](1, s["ema_decay"]))
    for key in ("G", "D", "G_ema"):
        for name, tensor in a[key].state_dict().items():
            assert torch.equal(tensor, b[key].state_dict()[name]), f"{key}.{name}"


def test_build_training_parts_uses_the_settings(nb):
    parts, s = recipe(nb, beta1=0.3, beta2=0.95, lr_d=1e-3, g_batchnorm=False, d_dropout=0.2)
    for opt in (parts["opt_G"], parts["opt_D"]):
        assert opt.param_groups[0]["betas"] == (0.3, 0.95)
    assert parts["opt_D"].param_groups[0]["lr"] == 1e-3
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in parts["G"].modules())
    assert not parts["G_ema"].training and not any(p.requires_grad for p in parts["G_ema"].parameters())
    assert all(torch.equal(p, q) for p, q in zip(parts["G"].parameters(), parts["G_ema"].parameters()))


def test_generator_loss_values(nb):
    zero = torch.zeros(4)
    assert nb["generator_loss"](zero, "non_saturating").item() == pytest.approx(math.log(2))
    assert nb["generator_loss"](zero, "minimax").item() == pytest.approx(-math.log(2))
    x = torch.tensor([2.0, -1.0])
    d = torch.sigmoid(x)
    # non-saturating: -log D(G(z));  minimax: log(1 - D(G(z)))
    assert nb["generator_loss"](x, "non_saturating").item() == pytest.approx(-torch.log(d).mean().item(), rel=1e-5)
    assert nb["generator_loss"](x, "minimax").item() == pytest.approx(torch.log(1 - d).mean().item(), rel=1e-5)


def test_discriminator_loss_values(nb):
    zero = torch.zeros(4)
    assert nb["discriminator_loss"](zero, zero).item() == pytest.approx(2 * math.log(2))
    real, fake = torch.tensor([3.0]), torch.tensor([-2.0])
    expected = -math.log(torch.sigmoid(real).item()) - math.log(1 - torch.sigmoid(fake).item())
    assert nb["discriminator_loss"](real, fake).item() == pytest.approx(expected, rel=1e-5)
    # one-sided label smoothing: real target 0.9
    p = torch.sigmoid(real).item()
    smoothed = -(0.9 * math.log(p) + 0.1 * math.log(1 - p)) - math.log(1 - torch.sigmoid(fake).item())
    assert nb["discriminator_loss"](real, fake, 0.9).item() == pytest.approx(smoothed, rel=1e-5)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writes_get_ordinary_permissions(tmp_path, umask_022):
    # Run outputs (metrics, grids, checkpoints) should be readable like any file written with open():
    # 0o666 less the umask, not the 0o600 of a private temporary file.
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"x")
    run_safety.atomic_write_bytes(tmp_path / "atomic.txt", b"x")
    gu.save_grid(torch.zeros(4, 784), tmp_path / "grid.png")
    run_safety.save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1})
    expected = plain.stat().st_mode & 0o777
    assert expected == 0o644
    for name in ("atomic.txt", "grid.png", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, f"{name} is {oct((tmp_path / name).stat().st_mode & 0o777)}"


def linear_discriminator(w):
    # D(x) = w . x: its gradient with respect to every image is w, so R1's penalty is |w|^2.
    D = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 1, bias=False))
    with torch.no_grad():
        D[1].weight.copy_(w)
    return D


def test_r1_penalty_of_a_linear_discriminator(nb):
    w = torch.linspace(-1, 1, 784)[None]
    D = linear_discriminator(w)
    penalty = nb["r1_penalty"](D, torch.rand(8, 1, 28, 28))
    assert penalty.item() == pytest.approx(w.square().sum().item(), rel=1e-6)
    penalty.backward()  # differentiable: d|w|^2/dw = 2w
    assert torch.allclose(D[1].weight.grad, 2 * w, atol=1e-6)


def test_r1_step_is_one_descent_step_on_the_weighted_penalty(nb):
    w = torch.linspace(-1, 1, 784)[None]
    D = linear_discriminator(w)
    opt = torch.optim.SGD(D.parameters(), lr=0.01)
    real = torch.rand(8, 784)
    real_before = real.clone()
    nb["r1_step"](D, opt, real, gamma=2.0, every=4)
    # loss = gamma / 2 * every * |w|^2  ->  gradient gamma * every * w = 8w  ->  w - 0.01 * 8w
    assert torch.allclose(D[1].weight, w * (1 - 0.08), atol=1e-6)
    assert torch.equal(real, real_before) and not real.requires_grad  # the batch itself is untouched


def test_generate_images_is_seeded_and_leaves_the_global_stream_alone(nb):
    torch.manual_seed(0)
    G = nb["Generator"](16, batchnorm=True).train()
    state = torch.get_rng_state()
    a = gu.generate_images(G, 1500, 16, seed=7)  # more than one chunk of 1,000
    b = gu.generate_images(G, 1500, 16, seed=7)
    assert a.shape == (1500, 784) and torch.equal(a, b) and not G.training
    assert torch.equal(torch.get_rng_state(), state)


def test_settings_changed_counts_a_later_setting_as_what_the_checkpoint_trained_with(defaults):
    old = {k: v for k, v in defaults.items() if k != "beta2"}  # from before beta2 was a setting
    assert gu.settings_changed(old, defaults) == {}  # it trained with 0.999, the default now
    assert gu.settings_changed(old, {**defaults, "beta2": 0.99, "lr_d": 1e-3}) == {
        "beta2": (0.999, 0.99), "lr_d": (defaults["lr_d"], 1e-3)}
    # a resume always changes where the run reads and writes: not news worth printing
    moved = {**defaults, "resume": "runs/x/checkpoint.pt", "run_dir": "runs/y", "overwrite": True, "epochs": 80}
    assert gu.settings_changed(defaults, moved) == {"epochs": (defaults["epochs"], 80)}
