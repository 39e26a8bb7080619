"""gan/hardware.py: the device, the matmul precision (measured, cached), the conv weights' layout, and the
CUDA-graph step (its logic, on the CPU: it trains exactly as the eager train_step)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
import pytest
import torch

from gan import errors
from gan import hardware
from gan import runs
from gan import vanilla_gan as method


def test_pick_device_cpu():
    assert hardware.pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("requested", ["cuda", "cuda:1"])
def test_pick_device_cuda_without_gpu(monkeypatch, requested):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(errors.ParameterError) as info:
        hardware.pick_device(requested)
    assert requested in str(info.value) and "'cpu'" in str(info.value)


def test_pick_device_auto_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert hardware.pick_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_pick_device_cuda_really_absent():
    with pytest.raises(errors.ParameterError):
        hardware.pick_device("cuda")


def test_float32_matmul_precision_is_set_inside_the_block_and_restored_after_it():
    assert torch.get_float32_matmul_precision() == "highest"
    with hardware.float32_matmul_precision("medium"):
        assert torch.get_float32_matmul_precision() == "medium"
    assert torch.get_float32_matmul_precision() == "highest"
    with pytest.raises(KeyboardInterrupt), hardware.float32_matmul_precision("high"):
        raise KeyboardInterrupt  # an interrupted epoch must not leave evaluation in reduced precision
    assert torch.get_float32_matmul_precision() == "highest"


def test_medium_matmul_precision_is_close_to_float32():
    # bfloat16 inputs, float32 accumulation: about 3 significant digits, far from garbage.
    a, b = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)), torch.randn(256, 32)
    exact = a @ b
    with hardware.float32_matmul_precision("medium"):
        reduced = a @ b
    assert reduced.dtype == torch.float32
    assert (reduced - exact).abs().max() < 0.05 * exact.abs().max()


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def precision_cache(tmp_path, monkeypatch):
    """The precision cache in a fresh folder, and the measurement replaced by a stand-in that counts
    its calls and returns the speed-up the test sets."""
    path = tmp_path / "cache" / "matmul_precision.json"
    monkeypatch.setattr(hardware, "precision_cache_path", lambda: path)
    measured = {"speedup": 2.0, "calls": 0}

    def fake_measurement(device, layers, **kwargs):
        measured["calls"] += 1
        return measured["speedup"]
    monkeypatch.setattr(hardware, "medium_precision_speedup", fake_measurement)
    return path, measured


LAYERS = hardware.mlp_step_layers({"batch_size": 4, "d_hidden": [12, 6], "g_hidden": [8, 16]})


def test_the_measured_layers_are_the_steps_largest():
    # D's first two layers see a batch of real and one of fake images; G's last layer makes the pixels.
    assert LAYERS == [(8, 784, 12), (8, 12, 6), (4, 16, 784)]


@pytest.mark.parametrize("speedup, expected", [(2.6, "medium"), (1.25, "medium"), (1.2, "highest"), (0.9, "highest")])
def test_auto_precision_takes_bfloat16_only_where_it_measured_clearly_faster(precision_cache, speedup, expected):
    _, measured = precision_cache
    measured["speedup"] = speedup
    precision, why = hardware.resolve_matmul_precision("auto", torch.device("cpu"), LAYERS)
    assert precision == expected
    assert f"{speedup:.2f}x" in why and "measured now" in why  # the number it chose by, printed by the notebook


def test_the_measurement_is_cached_per_machine_and_reused(precision_cache):
    path, measured = precision_cache
    first = hardware.resolve_matmul_precision("auto", torch.device("cpu"), LAYERS)
    again = hardware.resolve_matmul_precision("auto", torch.device("cpu"), LAYERS)
    assert measured["calls"] == 1 and first[0] == again[0] == "medium"
    assert "measured earlier" in again[1] and str(path) in again[1]  # where to delete it to measure again
    other_layers = hardware.mlp_step_layers({"batch_size": 4, "d_hidden": [24, 6], "g_hidden": [8, 16]})
    hardware.resolve_matmul_precision("auto", torch.device("cpu"), other_layers)
    assert measured["calls"] == 2 and len(json.loads(path.read_text())) == 2


@pytest.mark.parametrize("content", ["{not json", '["a list"]', '{"key": "fast"}', '{"key": -1}'])
def test_a_damaged_cache_is_measured_again_and_replaced(precision_cache, content, capsys):
    path, measured = precision_cache
    path.parent.mkdir(parents=True)
    path.write_text(content)
    precision, why = hardware.resolve_matmul_precision("auto", torch.device("cpu"), LAYERS)
    assert precision == "medium" and measured["calls"] == 1 and "measured now" in why
    assert "ignoring the cached precision measurements" in capsys.readouterr().out
    assert list(json.loads(path.read_text()).values()) == [2.0]


def test_a_cache_that_cannot_be_written_costs_only_a_measurement_next_time(precision_cache, capsys):
    path, measured = precision_cache
    path.parent.write_text("a file where the cache folder should be")
    assert hardware.resolve_matmul_precision("auto", torch.device("cpu"), LAYERS)[0] == "medium"
    assert "could not cache the precision measurement" in capsys.readouterr().out


def test_an_explicit_precision_and_networks_without_linear_layers_are_not_measured(precision_cache):
    _, measured = precision_cache
    for explicit in ("highest", "high", "medium"):  # an explicit setting is never second-guessed
        assert hardware.resolve_matmul_precision(explicit, torch.device("cpu"), LAYERS) == (explicit, "as set")
    precision, why = hardware.resolve_matmul_precision("auto", torch.device("cpu"))  # DCGAN: convolutions
    assert precision == "highest" and "convolutions" in why
    assert measured["calls"] == 0


def test_the_real_measurement_times_both_precisions_and_leaves_the_random_stream_alone(monkeypatch):
    seen, real_precision = [], hardware.float32_matmul_precision

    def recording(precision):
        seen.append(precision)
        return real_precision(precision)
    monkeypatch.setattr(hardware, "float32_matmul_precision", recording)
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    speedup = hardware.medium_precision_speedup(torch.device("cpu"), LAYERS, rounds=2, reps=2)
    assert 0 < speedup < float("inf")
    assert seen == ["highest", "medium"] * (2 * len(LAYERS))  # back to back per layer: passing load hits both alike
    assert torch.equal(torch.rand(1), expected_next)
    assert torch.get_float32_matmul_precision() == "highest"  # restored after measuring


def small_settings(**changes):
    s = method.notebook_parameters()
    s.update(latent_dim=8, batch_size=16, d_hidden=[64, 32], **changes)
    return s


def fresh_parts(s):
    torch.manual_seed(0)
    return method.build_training_parts(s, torch.device("cpu"))


def batches(n_steps, batch_size=16):
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(batch_size, 784, generator=gen) * 2 - 1 for _ in range(n_steps)]


def train(step_fn, data, epoch=0, first_step=1, steps_per_epoch=100):
    # The training loop's calls, under a fixed random stream: the noise of each step is drawn inside it.
    torch.manual_seed(2)
    return [step_fn(real, epoch, first_step + i, steps_per_epoch).clone() for i, real in enumerate(data)]


def eager(parts, s):
    return lambda real, epoch, step, spe: method.train_step(parts, real, epoch, step, spe, s)


def captured(parts, s, backend=None, warmup=2):
    return hardware.CapturedSteps(method.step_schedule, method.apply_step, parts, s, (s["batch_size"], 784),
                            torch.device("cpu"), backend=backend or hardware.EagerBackend(), warmup=warmup)


def same_weights(a, b):
    return all(torch.equal(x, y) for key in ("G", "D", "G_ema")
               for x, y in zip(a[key].state_dict().values(), b[key].state_dict().values()))


@pytest.mark.parametrize("d_steps", [1, 2])
def test_captured_step_trains_exactly_as_train_step(d_steps):
    # d_steps 2 with r1_every 3: all four kinds of step (G update or not, R1 or not), each warmed up,
    # captured and replayed; the EMA's weight changes every step (its warm-up) through the static tensor.
    s = small_settings(d_steps=d_steps, r1_every=3)
    data = batches(20)
    reference_parts, parts = fresh_parts(s), fresh_parts(s)
    expected = train(eager(reference_parts, s), data)
    backend = hardware.EagerBackend()
    runner = captured(parts, s, backend)
    got = train(runner, data)
    assert all(torch.equal(e, g) for e, g in zip(expected, got))
    assert same_weights(reference_parts, parts)
    kinds = {(True, False, True), (True, True, True)} if d_steps == 1 else \
        {(True, False, True), (False, False, False), (True, True, True), (False, True, False)}
    assert set(runner.graphs) == kinds and backend.captures == len(kinds)  # one capture per kind, no more
    assert runner.eager_steps == {kind: 2 for kind in kinds}  # the warm-ups were real training steps
    assert all(kind in runner.graphs for kind in kinds)


def test_the_ema_update_with_a_tensor_weight_equals_the_one_with_a_number():
    s = small_settings()
    parts = fresh_parts(s)
    with torch.no_grad():
        for p in parts["G"].parameters():
            p.add_(1.0)
    by_number, by_tensor = copy.deepcopy(parts["G_ema"]), copy.deepcopy(parts["G_ema"])
    weight = 1.0 - method.ema_decay_at(123, 0.999)
    method.update_ema(by_number, parts["G"], weight)
    method.update_ema(by_tensor, parts["G"], torch.tensor(weight))
    assert all(torch.equal(a, b) for a, b in zip(by_number.state_dict().values(), by_tensor.state_dict().values()))


def test_a_changed_learning_rate_is_captured_anew_at_the_next_epoch():
    s = small_settings(r1_gamma=0.0)
    reference_parts, parts = fresh_parts(s), fresh_parts(s)
    backend = hardware.EagerBackend()
    runner = captured(parts, s, backend)
    ref_step = eager(reference_parts, s)
    data = batches(6)
    assert all(torch.equal(a, b) for a, b in zip(train(ref_step, data), train(runner, data)))
    assert backend.captures == 1
    for p in (parts, reference_parts):  # as the training cell does when lr_d was changed before re-running it
        for group in p["opt_D"].param_groups:
            group["lr"] = 1e-3
    got = train(runner, data, epoch=1)
    assert backend.captures == 2  # the old graph had the old rate baked in
    assert all(torch.equal(a, b) for a, b in zip(train(ref_step, data, epoch=1), got))
    assert same_weights(reference_parts, parts)


def test_a_rollback_replaces_the_optimizer_state_and_the_graphs_follow(tmp_path):
    # An interrupt rolls back to the last snapshot: load_state_dict gives Adam new state tensors, so a
    # graph recorded with the old ones would update tensors nobody reads. The runner must capture anew.
    s = small_settings(r1_gamma=0.0)
    parts = fresh_parts(s)
    backend = hardware.EagerBackend()
    runner = captured(parts, s, backend)
    data = batches(5)
    train(runner, data)
    saved = runs.snapshot(s, 1, parts, torch.zeros(1), [])
    train(runner, data, epoch=1)  # the epoch that gets interrupted
    runs.roll_back(saved, parts, tmp_path / "checkpoint.pt", tmp_path)
    captures_before = backend.captures
    after_rollback = train(runner, data, epoch=1)
    assert backend.captures == captures_before + 1

    reference = fresh_parts(s)  # the same epoch, eagerly, from the same snapshot
    for k in ("G", "D", "G_ema", "opt_G", "opt_D"):
        reference[k].load_state_dict(saved[k])
    expected = train(eager(reference, s), data, epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(expected, after_rollback))
    assert same_weights(reference, parts)


def test_a_minibatch_of_another_shape_is_refused_with_what_to_do():
    s = small_settings(r1_gamma=0.0)
    runner = captured(fresh_parts(s), s, warmup=0)
    with pytest.raises(ValueError, match="re-run the training cell"):
        runner(torch.zeros(8, 784), 0, 1, 10)


def test_cuda_graphs_on_a_cpu_fall_back_to_the_eager_step_and_say_so():
    s = small_settings()
    parts, reference = fresh_parts(s), fresh_parts(s)
    said = []
    run = hardware.step_runner(vars(method), parts, s, (16, 784), torch.device("cpu"), cuda_graphs=True, report=said.append)
    assert len(said) == 1 and "needs a CUDA device" in said[0]
    data = batches(3)
    assert all(torch.equal(a, b) for a, b in zip(train(run, data), train(eager(reference, s), data)))
    quiet = []
    hardware.step_runner(vars(method), parts, s, (16, 784), torch.device("cpu"), cuda_graphs=False, report=quiet.append)
    assert quiet == []


def test_training_after_a_rollback_leaves_the_snapshot_as_it_was(tmp_path):
    # Interrupt, re-run the training cell, interrupt again before the epoch ends: the second rollback
    # must restore the same state as the first. (An optimizer's load_state_dict keeps the tensors it
    # is given, so without a copy the continued training would rewrite the snapshot's Adam moments.)
    s = small_settings(r1_gamma=0.0)
    parts = fresh_parts(s)
    data = batches(4)
    train(eager(parts, s), data)
    saved = runs.snapshot(s, 1, parts, torch.zeros(1), [])
    before = copy.deepcopy(saved)
    for _ in range(2):
        train(eager(parts, s), data, epoch=1)
        runs.roll_back(saved, parts, tmp_path / "checkpoint.pt", tmp_path)
    for key in ("G", "D", "G_ema"):
        assert all(torch.equal(a, b) for a, b in zip(saved[key].values(), before[key].values()))
    for key in ("opt_G", "opt_D"):
        assert all(torch.equal(v, before[key]["state"][i][name]) for i, state in saved[key]["state"].items()
                   for name, v in state.items())
        assert all(torch.equal(v, before[key]["state"][i][name]) for i, state in parts[key].state_dict()["state"].items()
                   for name, v in state.items())


def test_a_checkpoint_of_a_captured_run_trains_eagerly_elsewhere():
    # A GPU run with cuda_graphs saves Adam's param groups with capturable=True. Resumed where Adam
    # runs its foreach kernel (Apple's MPS; here the CPU stands in), capturable=True raises; the eager
    # runner sets it back for the run it makes.
    s = small_settings()
    parts = fresh_parts(s)
    hardware.set_capturable(parts, True)
    saved = {k: parts[k].state_dict() for k in ("opt_G", "opt_D")}
    resumed = fresh_parts(s)
    for k, net in (("opt_G", "G"), ("opt_D", "D")):
        resumed[k] = torch.optim.Adam(resumed[net].parameters(), foreach=True)
        resumed[k].load_state_dict(saved[k])
    assert resumed["opt_D"].param_groups[0]["capturable"] is True
    run = hardware.step_runner(vars(method), resumed, s, (16, 784), torch.device("cpu"), cuda_graphs=False)
    assert resumed["opt_D"].param_groups[0]["capturable"] is False
    train(run, batches(2))  # with capturable=True: "params and state_steps must be on supported devices"


def test_convolutional_weights_lie_channels_last_on_a_cpu_and_unchanged_elsewhere():
    assert hardware.conv_memory_format(torch.device("cpu")) is torch.channels_last
    assert hardware.conv_memory_format(torch.device("cuda")) is torch.preserve_format
    assert hardware.conv_memory_format("mps") is torch.preserve_format
