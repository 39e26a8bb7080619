"""gan_speed on the CPU: what `matmul_precision = "auto"` picks, and the logic of the CUDA-graph step.

No CUDA here: CapturedSteps runs with EagerBackend, which "captures" a function without running it and
"replays" it on the same static buffers. Everything around the graphs (which kinds of step get a graph,
the warm-up steps, the static minibatch and EMA weight, re-capture after a settings change or a
rollback) is the code a GPU runs, and must train exactly as the notebook's train_step does.
"""

import copy
from pathlib import Path

import pytest
import torch

import gan_speed as gs
import gan_utils as gu

REPO = Path(__file__).resolve().parents[1]
CPUINFO_AMX = "flags\t\t: fpu sse2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
CPUINFO_NO_AMX = "flags\t\t: fpu sse2 avx512f avx512_bf16\n"


@pytest.mark.parametrize("cpuinfo, max_isa, expected", [
    (CPUINFO_AMX, "", True),
    (CPUINFO_AMX, "ALL", True),
    (CPUINFO_AMX, "avx512_core_amx", True),
    (CPUINFO_AMX, "AVX512_CORE_BF16", False),  # the cap that makes an AMX machine behave like one without
    (CPUINFO_NO_AMX, "", False),
    ("", "", False),
])
def test_amx_is_what_the_cpu_reports_unless_onednn_is_capped_below_it(cpuinfo, max_isa, expected):
    assert gs.cpu_has_amx(cpuinfo, max_isa) is expected


def test_auto_precision_is_bfloat16_with_amx_or_on_a_gpu_and_float32_on_other_cpus():
    cpu = torch.device("cpu")
    assert gs.resolve_matmul_precision("auto", cpu, amx=True)[0] == "medium"
    precision, why = gs.resolve_matmul_precision("auto", cpu, amx=False)
    assert precision == "highest" and "no AMX" in why
    assert gs.resolve_matmul_precision("auto", torch.device("cuda"))[0] == "medium"
    for explicit in ("highest", "high", "medium"):  # an explicit setting is never second-guessed
        assert gs.resolve_matmul_precision(explicit, cpu, amx=False) == (explicit, "as set")


def test_auto_d_widths_are_narrower_only_on_a_cpu_without_amx_and_a_resume_keeps_its_own():
    cpu = torch.device("cpu")
    assert gs.resolve_d_hidden("auto", cpu, amx=True)[0] == [1024, 512, 256]
    widths, why = gs.resolve_d_hidden("auto", cpu, amx=False)
    assert widths == [768, 384, 192] and "no AMX" in why
    assert gs.resolve_d_hidden("auto", torch.device("cuda"), amx=False)[0] == [1024, 512, 256]
    assert gs.resolve_d_hidden([64, 32], cpu, amx=False) == ([64, 32], "as set")  # never second-guessed
    assert gs.resolve_d_hidden((64, 32), cpu, {"d_hidden": [128]}) == ([64, 32], "as set")  # the fit check then refuses
    # "auto" continues the networks a checkpoint (or this kernel) holds, whatever this machine would pick;
    # a checkpoint from before the setting existed holds the old fixed widths.
    widths, why = gs.resolve_d_hidden("auto", cpu, {"d_hidden": [768, 384, 192]}, amx=True)
    assert widths == [768, 384, 192] and "continued" in why
    assert gs.resolve_d_hidden("auto", cpu, {"latent_dim": 100}, amx=False)[0] == [1024, 512, 256]


def test_auto_precision_is_an_allowed_value_and_a_typo_is_refused():
    gu.validate_parameters({"matmul_precision": "auto", "cuda_graphs": True, "d_hidden": "auto"})
    with pytest.raises(gu.ParameterError, match="matmul_precision.*'auto'"):
        gu.validate_parameters({"matmul_precision": "bf16"})
    with pytest.raises(gu.ParameterError, match="cuda_graphs"):
        gu.validate_parameters({"cuda_graphs": "yes"})


@pytest.fixture(scope="module")
def nb():
    return gu.load_notebook_definitions(REPO / "Vanilla_GAN.ipynb")


def settings(**changes):
    s = gu.notebook_defaults(REPO / "Vanilla_GAN.ipynb")
    s.update(latent_dim=8, batch_size=16, d_hidden=[64, 32], **changes)
    return s


def fresh_parts(nb, s):
    torch.manual_seed(0)
    return nb["build_training_parts"](s, torch.device("cpu"))


def batches(n_steps, batch_size=16):
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(batch_size, 784, generator=gen) * 2 - 1 for _ in range(n_steps)]


def train(step_fn, data, epoch=0, first_step=1, steps_per_epoch=100):
    # The training loop's calls, under a fixed random stream: the noise of each step is drawn inside it.
    torch.manual_seed(2)
    return [step_fn(real, epoch, first_step + i, steps_per_epoch).clone() for i, real in enumerate(data)]


def eager(nb, parts, s):
    return lambda real, epoch, step, spe: nb["train_step"](parts, real, epoch, step, spe, s)


def captured(nb, parts, s, backend=None, warmup=2):
    return gs.CapturedSteps(nb["step_schedule"], nb["apply_step"], parts, s, (s["batch_size"], 784),
                            torch.device("cpu"), backend=backend or gs.EagerBackend(), warmup=warmup)


def same_weights(a, b):
    return all(torch.equal(x, y) for key in ("G", "D", "G_ema")
               for x, y in zip(a[key].state_dict().values(), b[key].state_dict().values()))


@pytest.mark.parametrize("d_steps", [1, 2])
def test_captured_step_trains_exactly_as_train_step(nb, d_steps):
    # d_steps 2 with r1_every 3: all four kinds of step (G update or not, R1 or not), each warmed up,
    # captured and replayed; the EMA's weight changes every step (its warm-up) through the static tensor.
    s = settings(d_steps=d_steps, r1_every=3)
    data = batches(20)
    reference_parts, parts = fresh_parts(nb, s), fresh_parts(nb, s)
    expected = train(eager(nb, reference_parts, s), data)
    backend = gs.EagerBackend()
    runner = captured(nb, parts, s, backend)
    got = train(runner, data)
    assert all(torch.equal(e, g) for e, g in zip(expected, got))
    assert same_weights(reference_parts, parts)
    kinds = {(True, False, True), (True, True, True)} if d_steps == 1 else \
        {(True, False, True), (False, False, False), (True, True, True), (False, True, False)}
    assert set(runner.graphs) == kinds and backend.captures == len(kinds)  # one capture per kind, no more
    assert runner.eager_steps == {kind: 2 for kind in kinds}  # the warm-ups were real training steps
    assert all(kind in runner.graphs for kind in kinds)


def test_the_ema_update_with_a_tensor_weight_equals_the_one_with_a_number(nb):
    s = settings()
    parts = fresh_parts(nb, s)
    with torch.no_grad():
        for p in parts["G"].parameters():
            p.add_(1.0)
    by_number, by_tensor = copy.deepcopy(parts["G_ema"]), copy.deepcopy(parts["G_ema"])
    weight = 1.0 - nb["ema_decay_at"](123, 0.999)
    nb["update_ema"](by_number, parts["G"], weight)
    nb["update_ema"](by_tensor, parts["G"], torch.tensor(weight))
    assert all(torch.equal(a, b) for a, b in zip(by_number.state_dict().values(), by_tensor.state_dict().values()))


def test_a_changed_learning_rate_is_captured_anew_at_the_next_epoch(nb):
    s = settings(r1_gamma=0.0)
    reference_parts, parts = fresh_parts(nb, s), fresh_parts(nb, s)
    backend = gs.EagerBackend()
    runner = captured(nb, parts, s, backend)
    ref_step = eager(nb, reference_parts, s)
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


def test_a_rollback_replaces_the_optimizer_state_and_the_graphs_follow(nb, tmp_path):
    # An interrupt rolls back to the last snapshot: load_state_dict gives Adam new state tensors, so a
    # graph recorded with the old ones would update tensors nobody reads. The runner must capture anew.
    s = settings(r1_gamma=0.0)
    parts = fresh_parts(nb, s)
    backend = gs.EagerBackend()
    runner = captured(nb, parts, s, backend)
    data = batches(5)
    train(runner, data)
    saved = gu.snapshot(s, 1, parts, torch.zeros(1), [])
    train(runner, data, epoch=1)  # the epoch that gets interrupted
    gu.roll_back(saved, parts, tmp_path / "checkpoint.pt", tmp_path)
    captures_before = backend.captures
    after_rollback = train(runner, data, epoch=1)
    assert backend.captures == captures_before + 1

    reference = fresh_parts(nb, s)  # the same epoch, eagerly, from the same snapshot
    for k in ("G", "D", "G_ema", "opt_G", "opt_D"):
        reference[k].load_state_dict(saved[k])
    expected = train(eager(nb, reference, s), data, epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(expected, after_rollback))
    assert same_weights(reference, parts)


def test_a_minibatch_of_another_shape_is_refused_with_what_to_do(nb):
    s = settings(r1_gamma=0.0)
    runner = captured(nb, fresh_parts(nb, s), s, warmup=0)
    with pytest.raises(ValueError, match="re-run the training cell"):
        runner(torch.zeros(8, 784), 0, 1, 10)


def test_cuda_graphs_on_a_cpu_fall_back_to_the_eager_step_and_say_so(nb):
    s = settings()
    parts, reference = fresh_parts(nb, s), fresh_parts(nb, s)
    said = []
    run = gs.step_runner(nb, parts, s, (16, 784), torch.device("cpu"), cuda_graphs=True, report=said.append)
    assert len(said) == 1 and "needs a CUDA device" in said[0]
    data = batches(3)
    assert all(torch.equal(a, b) for a, b in zip(train(run, data), train(eager(nb, reference, s), data)))
    quiet = []
    gs.step_runner(nb, parts, s, (16, 784), torch.device("cpu"), cuda_graphs=False, report=quiet.append)
    assert quiet == []


def test_training_after_a_rollback_leaves_the_snapshot_as_it_was(nb, tmp_path):
    # Interrupt, re-run the training cell, interrupt again before the epoch ends: the second rollback
    # must restore the same state as the first. (An optimizer's load_state_dict keeps the tensors it
    # is given, so without a copy the continued training would rewrite the snapshot's Adam moments.)
    s = settings(r1_gamma=0.0)
    parts = fresh_parts(nb, s)
    data = batches(4)
    train(eager(nb, parts, s), data)
    saved = gu.snapshot(s, 1, parts, torch.zeros(1), [])
    before = copy.deepcopy(saved)
    for _ in range(2):
        train(eager(nb, parts, s), data, epoch=1)
        gu.roll_back(saved, parts, tmp_path / "checkpoint.pt", tmp_path)
    for key in ("G", "D", "G_ema"):
        assert all(torch.equal(a, b) for a, b in zip(saved[key].values(), before[key].values()))
    for key in ("opt_G", "opt_D"):
        assert all(torch.equal(v, before[key]["state"][i][name]) for i, state in saved[key]["state"].items()
                   for name, v in state.items())
        assert all(torch.equal(v, before[key]["state"][i][name]) for i, state in parts[key].state_dict()["state"].items()
                   for name, v in state.items())


def test_a_checkpoint_of_a_captured_run_trains_eagerly_elsewhere(nb):
    # A GPU run with cuda_graphs saves Adam's param groups with capturable=True. Resumed where Adam
    # runs its foreach kernel (Apple's MPS; here the CPU stands in), capturable=True raises; the eager
    # runner sets it back for the run it makes.
    s = settings()
    parts = fresh_parts(nb, s)
    gs.set_capturable(parts, True)
    saved = {k: parts[k].state_dict() for k in ("opt_G", "opt_D")}
    resumed = fresh_parts(nb, s)
    for k, net in (("opt_G", "G"), ("opt_D", "D")):
        resumed[k] = torch.optim.Adam(resumed[net].parameters(), foreach=True)
        resumed[k].load_state_dict(saved[k])
    assert resumed["opt_D"].param_groups[0]["capturable"] is True
    run = gs.step_runner(nb, resumed, s, (16, 784), torch.device("cpu"), cuda_graphs=False)
    assert resumed["opt_D"].param_groups[0]["capturable"] is False
    train(run, batches(2))  # with capturable=True: "params and state_steps must be on supported devices"
