"""gan/vanilla_gan.py, the method Vanilla_GAN.ipynb exports: the networks, the losses, the EMA and its
BatchNorm recalibration, and one training step (Algorithm 1, the lazy R1 step), including that the
step never waits for the device."""

from __future__ import annotations

import copy
import math
from pathlib import Path
import pytest
import torch

from gan import vanilla_gan as method
from torch.overrides import TorchFunctionMode


def make_models(batchnorm=True, seed=0):
    torch.manual_seed(seed)
    G, D = method.Generator(100, batchnorm=batchnorm), method.Discriminator(dropout=0.3)
    opt_G = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    return G, D, opt_G, opt_D


def weights(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module):
    return [not torch.equal(b, p) for b, p in zip(before, module.parameters())]


def linear_discriminator(w):
    # D(x) = w . x: its gradient with respect to every image is w, so R1's penalty is |w|^2.
    D = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 1, bias=False))
    with torch.no_grad():
        D[1].weight.copy_(w)
    return D


def test_update_ema_math():
    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(0.0)
        for p in model.parameters():
            p.fill_(1.0)
        model[1].running_mean.fill_(7.0)
    method.update_ema(ema, model, weight=0.1)  # weight = 1 - decay: theta_ema moves 10% of the way
    for p in ema.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.1))
    method.update_ema(ema, model, weight=torch.tensor(0.1))  # a captured step passes a 0-d tensor
    for p in ema.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.19))
    assert ema[1].running_mean.item() == 7.0  # buffers are copied, not averaged
    for p in model.parameters():
        assert torch.equal(p, torch.ones_like(p))  # the source is untouched


def test_recalibrate_batchnorm_matches_the_noise_statistics():
    torch.manual_seed(0)
    G = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.BatchNorm1d(3), torch.nn.Tanh())
    G[1].running_mean.fill_(5.0)  # stale statistics, as copied from another model's weights
    G[1].running_var.fill_(9.0)
    global_state = torch.get_rng_state()
    assert method.recalibrate_batchnorm(G, latent_dim=4, batches=4, batch_size=250, seed=3) is G
    assert not G.training
    assert torch.equal(torch.get_rng_state(), global_state)  # training's random stream untouched
    # Known answer: the statistics of the pre-BatchNorm activations over exactly that noise.
    rng = torch.Generator().manual_seed(3)
    with torch.no_grad():
        h = torch.stack([G[0](torch.randn(250, 4, generator=rng)) for _ in range(4)])  # (batch, row, unit)
    assert torch.allclose(G[1].running_mean, h.mean((0, 1)), atol=1e-6)
    assert torch.allclose(G[1].running_var, h.var(1).mean(0), atol=1e-6)  # each batch's unbiased variance, averaged


def test_recalibrate_batchnorm_leaves_models_without_batchnorm_alone():
    G = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    before = copy.deepcopy(G.state_dict())
    method.recalibrate_batchnorm(G, latent_dim=4)
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items()) and not G.training


def test_ema_decay_warms_up_towards_the_setting():
    assert method.ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert method.ema_decay_at(90, 0.999) == pytest.approx(91 / 100)
    assert method.ema_decay_at(10 ** 6, 0.999) == 0.999


def test_notebook_definitions_present():
    for name in ("Generator", "Discriminator", "discriminator_loss", "generator_loss", "r1_penalty",
                 "adversarial_update", "r1_step", "ema_decay_at", "update_ema", "step_schedule", "apply_step", "train_step",
                 "recalibrate_batchnorm", "build_training_parts"):
        assert name in name


@pytest.mark.parametrize("batchnorm", [True, False])
def test_generator_shapes(batchnorm):
    torch.manual_seed(0)
    G = method.Generator(100, batchnorm=batchnorm)
    for mode in ("train", "eval"):
        getattr(G, mode)()
        with torch.no_grad():
            out = G(torch.randn(6, 100))
        assert out.shape == (6, 784)
        assert out.min() >= -1 and out.max() <= 1
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in G.modules()) == batchnorm
    assert method.Generator(16, batchnorm=batchnorm)(torch.randn(3, 16)).shape == (3, 784)


def test_hidden_widths_set_the_layers():
    G = method.Generator(16, [32, 64], batchnorm=False)
    D = method.Discriminator([48])
    linear = torch.nn.Linear
    assert [(m.in_features, m.out_features) for m in G.modules() if isinstance(m, linear)] == [(16, 32), (32, 64), (64, 784)]
    assert [(m.in_features, m.out_features) for m in D.modules() if isinstance(m, linear)] == [(784, 48), (48, 1)]
    assert G(torch.randn(3, 16)).shape == (3, 784) and D(G(torch.randn(3, 16))).shape == (3,)


def test_discriminator_shapes():
    torch.manual_seed(0)
    D = method.Discriminator(dropout=0.3).eval()
    with torch.no_grad():
        logits = D(torch.rand(6, 784) * 2 - 1)
        assert logits.shape == (6,)
        assert torch.equal(D(torch.zeros(6, 1, 28, 28)), D(torch.zeros(6, 784)))  # images are flattened
    assert (logits.abs() > 0).all()  # raw logits, not probabilities clamped to [0, 1] by a sigmoid


@pytest.mark.parametrize("g_loss", ["non_saturating", "minimax"])
def test_adversarial_update_updates_both(g_loss):
    G, D, opt_G, opt_D = make_models()
    g0, d0 = weights(G), weights(D)
    real = torch.rand(32, 784) * 2 - 1
    out = method.adversarial_update(G, D, opt_G, opt_D, real, 100, g_loss)
    assert out.shape == (5,) and torch.isfinite(out).all()
    loss_d, d_x, d_gz, loss_g, g_updated = out.tolist()
    assert loss_d > 0 and 0 < d_x < 1 and 0 < d_gz < 1 and g_updated == 1.0
    assert (loss_g > 0) if g_loss == "non_saturating" else (loss_g < 0)
    assert all(changed(g0, G)) and all(changed(d0, D))
    assert all(p.requires_grad for p in D.parameters())  # D unfrozen again after G's step


def test_adversarial_update_without_g_update():
    G, D, opt_G, opt_D = make_models()
    g0, d0 = weights(G), weights(D)
    out = method.adversarial_update(G, D, opt_G, opt_D, torch.rand(32, 784) * 2 - 1, 100, update_g=False)
    assert torch.isfinite(out).all()
    assert out[3].item() == 0.0 and out[4].item() == 0.0
    assert not any(changed(g0, G))
    assert all(changed(d0, D))


def test_adversarial_update_is_deterministic():
    outs = []
    for _ in range(2):
        G, D, opt_G, opt_D = make_models(seed=3)
        real = torch.linspace(-1, 1, 16 * 784).reshape(16, 784)
        torch.manual_seed(11)
        outs.append((method.adversarial_update(G, D, opt_G, opt_D, real, 100), weights(G)))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def recipe(**changes):
    """The notebook's default settings (a smaller latent) with `changes`, and parts built from them."""
    s = {**method.notebook_parameters(), "latent_dim": 16, "d_hidden": [1024, 512, 256], **changes}
    torch.manual_seed(0)
    return method.build_training_parts(s, "cpu"), s


def test_train_step_schedule_of_g_r1_and_ema_steps(monkeypatch):
    # d_steps 2: G and its EMA move on every second step; R1 on multiples of r1_every; the EMA's
    # warm-up counts G steps since training began, here in the second epoch of 10-step epochs.
    parts, s = recipe(d_steps=2, r1_every=3)
    calls = []
    monkeypatch.setattr(method, "r1_step", lambda *args: calls.append("r1"))
    monkeypatch.setattr(method, "update_ema", lambda ema, G, weight: calls.append(("ema", 1.0 - weight)))
    real = torch.rand(16, 784) * 2 - 1
    for step in range(1, 7):
        calls.append(step)
        stats = method.train_step(parts, real, 1, step, 10, s)
        assert stats[4].item() == float(step % 2 == 0)  # 1 when G was updated
    ema = [("ema", pytest.approx(method.ema_decay_at(g_steps, s["ema_decay"]), abs=1e-12)) for g_steps in (6, 7, 8)]
    assert calls == [1, 2, ema[0], 3, "r1", 4, ema[1], 5, 6, "r1", ema[2]]


def test_train_step_is_the_update_then_r1_then_ema():
    (a, s), (b, _) = recipe(r1_every=1), recipe(r1_every=1)
    real = torch.rand(16, 784) * 2 - 1
    torch.manual_seed(5)
    method.train_step(a, real, 0, 1, 10, s)
    torch.manual_seed(5)
    method.adversarial_update(b["G"], b["D"], b["opt_G"], b["opt_D"], real, 16, s["g_loss"], 1.0, True)
    method.r1_step(b["D"], b["opt_D"], real, s["r1_gamma"], 1)
    method.update_ema(b["G_ema"], b["G"], 1.0 - method.ema_decay_at(1, s["ema_decay"]))
    for key in ("G", "D", "G_ema"):
        for name, tensor in a[key].state_dict().items():
            assert torch.equal(tensor, b[key].state_dict()[name]), f"{key}.{name}"


def test_build_training_parts_uses_the_settings():
    parts, s = recipe(beta1=0.3, beta2=0.95, lr_d=1e-3, g_batchnorm=False, d_dropout=0.2)
    for opt in (parts["opt_G"], parts["opt_D"]):
        assert opt.param_groups[0]["betas"] == (0.3, 0.95)
    assert parts["opt_D"].param_groups[0]["lr"] == 1e-3
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in parts["G"].modules())
    assert not parts["G_ema"].training and not any(p.requires_grad for p in parts["G_ema"].parameters())
    assert all(torch.equal(p, q) for p, q in zip(parts["G"].parameters(), parts["G_ema"].parameters()))


def test_generator_loss_values():
    zero = torch.zeros(4)
    assert method.generator_loss(zero, "non_saturating").item() == pytest.approx(math.log(2))
    assert method.generator_loss(zero, "minimax").item() == pytest.approx(-math.log(2))
    x = torch.tensor([2.0, -1.0])
    d = torch.sigmoid(x)
    # non-saturating: -log D(G(z));  minimax: log(1 - D(G(z)))
    assert method.generator_loss(x, "non_saturating").item() == pytest.approx(-torch.log(d).mean().item(), rel=1e-5)
    assert method.generator_loss(x, "minimax").item() == pytest.approx(torch.log(1 - d).mean().item(), rel=1e-5)


def test_discriminator_loss_values():
    zero = torch.zeros(4)
    assert method.discriminator_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    real, fake = torch.tensor([3.0]), torch.tensor([-2.0])
    expected = -math.log(torch.sigmoid(real).item()) - math.log(1 - torch.sigmoid(fake).item())
    assert method.discriminator_loss(real, fake).item() == pytest.approx(expected, rel=1e-5)
    # one-sided label smoothing: real target 0.9
    p = torch.sigmoid(real).item()
    smoothed = -(0.9 * math.log(p) + 0.1 * math.log(1 - p)) - math.log(1 - torch.sigmoid(fake).item())
    assert method.discriminator_loss(real, fake, 0.9).item() == pytest.approx(smoothed, rel=1e-5)


def test_hinge_and_least_squares_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    # hinge: mean(max(0, 1 - D(x))) + mean(max(0, 1 + D(G(z)))); G: -mean(D(G(z)))
    assert method.discriminator_loss(real, fake, loss="hinge").item() == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)
    assert method.generator_loss(fake, loss="hinge").item() == pytest.approx(1.5)
    # least squares: 1/2 mean((D(x) - target)^2) + 1/2 mean(D(G(z))^2); G: 1/2 mean((D(G(z)) - 1)^2)
    assert method.discriminator_loss(real, fake, loss="least_squares").item() == pytest.approx(
        0.5 * ((1 + 0.25) / 2 + (9 + 0) / 2))
    assert method.discriminator_loss(real, fake, 0.9, "least_squares").item() == pytest.approx(
        0.5 * ((1.1 ** 2 + 0.4 ** 2) / 2 + 9 / 2))
    assert method.generator_loss(fake, loss="least_squares").item() == pytest.approx(0.5 * (16 + 1) / 2)


@pytest.mark.parametrize("loss", ["hinge", "least_squares"])
def test_the_other_games_update_both_and_log_ds_raw_scores(loss):
    G, D, opt_G, opt_D = make_models()
    D.eval()  # no dropout: the score below is the one the step sees
    g0, d0 = weights(G), weights(D)
    real = torch.rand(32, 784) * 2 - 1
    with torch.no_grad():
        raw_real = D(real).mean().item()  # D's score of the batch before its step: what is logged
    out = method.adversarial_update(G, D, opt_G, opt_D, real, 100, loss=loss)
    loss_d, d_x, _, _, g_updated = out.tolist()
    assert torch.isfinite(out).all() and loss_d > 0 and g_updated == 1.0
    assert d_x == pytest.approx(raw_real, rel=1e-4, abs=1e-6)  # the raw score, not its sigmoid
    # Every tensor of G moves; D's last bias may not: with every score inside the hinge's margins its
    # gradient is -1/n per real image and +1/n per fake, which cancel.
    assert all(changed(g0, G)) and sum(changed(d0, D)) >= len(d0) - 1


def test_r1_penalty_of_a_linear_discriminator():
    w = torch.linspace(-1, 1, 784)[None]
    D = linear_discriminator(w)
    penalty = method.r1_penalty(D, torch.rand(8, 1, 28, 28))
    assert penalty.item() == pytest.approx(w.square().sum().item(), rel=1e-6)
    penalty.backward()  # differentiable: d|w|^2/dw = 2w
    assert torch.allclose(D[1].weight.grad, 2 * w, atol=1e-6)


def test_r1_step_is_one_descent_step_on_the_weighted_penalty():
    w = torch.linspace(-1, 1, 784)[None]
    D = linear_discriminator(w)
    opt = torch.optim.SGD(D.parameters(), lr=0.01)
    real = torch.rand(8, 784)
    real_before = real.clone()
    method.r1_step(D, opt, real, gamma=2.0, every=4)
    # loss = gamma / 2 * every * |w|^2  ->  gradient gamma * every * w = 8w  ->  w - 0.01 * 8w
    assert torch.allclose(D[1].weight, w * (1 - 0.08), atol=1e-6)
    assert torch.equal(real, real_before) and not real.requires_grad  # the batch itself is untouched


REPO = Path(__file__).resolve().parents[1]


NOTEBOOK = REPO / "Vanilla_GAN.ipynb"


# Tensor methods that copy a value to the host: on a GPU each one stalls until the queue drains.
HOST_SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.cpu, torch.Tensor.numpy}


class RecordHostSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_SYNCS:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def make_pair(batchnorm=True):
    torch.manual_seed(0)
    G, D = method.Generator(16, batchnorm=batchnorm), method.Discriminator(dropout=0.3)
    opt_G = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=True)
    opt_D = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=True)
    return G, D, opt_G, opt_D


def test_adversarial_update_never_reads_values_to_the_host():
    G, D, opt_G, opt_D = make_pair()
    real = torch.rand(32, 784) * 2 - 1
    with RecordHostSyncs() as recorder:
        for update_g in (True, False):
            method.adversarial_update(G, D, opt_G, opt_D, real, 16, update_g=update_g)
    assert recorder.calls == []


def test_r1_step_never_reads_values_to_the_host():
    _, D, _, opt_D = make_pair()
    with RecordHostSyncs() as recorder:
        method.r1_step(D, opt_D, torch.rand(32, 784) * 2 - 1, 1.0, 4)
    assert recorder.calls == []


def test_the_whole_recipe_step_never_reads_values_to_the_host():
    # train_step with every part on: a G step, an R1 step (step 4) and the EMA update.
    s = {**method.notebook_parameters(), "latent_dim": 16, "r1_every": 4, "d_hidden": [1024, 512, 256]}
    parts = method.build_training_parts(s, "cpu")
    with RecordHostSyncs() as recorder:
        for step in (3, 4):
            method.train_step(parts, torch.rand(32, 784) * 2 - 1, 0, step, 10, s)
    assert recorder.calls == []


def test_reusing_the_fakes_gives_the_generator_step_of_algorithm_1():
    # adversarial_update reuses the D step's fakes for G's step. With the same z that is exactly the G step of
    # Algorithm 1 after D's update: check both networks against an explicit D step, then a fresh G forward
    # through the updated D (which a G step on the stale logits of the D step would fail).
    torch.manual_seed(0)
    G, D = method.Generator(16, batchnorm=False), method.Discriminator(dropout=0.0)  # no dropout: one D
    G2, D2 = copy.deepcopy(G), copy.deepcopy(D)
    opt_G, opt_D, opt_G2, opt_D2 = (torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.5, 0.999)) for m in (G, D, G2, D2))
    real = torch.rand(8, 784) * 2 - 1
    torch.manual_seed(1)
    method.adversarial_update(G, D, opt_G, opt_D, real, 16)

    torch.manual_seed(1)
    z = torch.randn(8, 16)  # the draw adversarial_update made
    opt_D2.zero_grad()
    method.discriminator_loss(D2(real), D2(G2(z).detach())).backward()
    opt_D2.step()
    opt_G2.zero_grad()
    method.generator_loss(D2(G2(z))).backward()  # fresh fakes, the updated D
    opt_G2.step()
    for a, b in zip([*G.parameters(), *D.parameters()], [*G2.parameters(), *D2.parameters()]):
        torch.testing.assert_close(a, b)
