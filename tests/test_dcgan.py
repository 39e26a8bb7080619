"""Memory layout of the convolutional networks (channels_last on a CPU) and of the optimizer state a
checkpoint brings back: the layout may change the speed, never what is computed."""

from __future__ import annotations

import torch

from gan import dcgan
from conftest import REPO_ROOT


DCGAN = REPO_ROOT / "DCGAN.ipynb"


SETTINGS = dcgan.notebook_parameters()


def conv_weights(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in net.parameters() if p.dim() == 4]


def test_dcgan_parts_are_channels_last_and_samples_come_out_in_the_usual_layout():
    parts = dcgan.build_training_parts(SETTINGS, torch.device("cpu"), 3)
    for key in ("G", "D", "G_ema"):
        weights = conv_weights(parts[key])
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights), key
    samples = parts["G_ema"](torch.randn(5, SETTINGS["latent_dim"]))
    assert samples.shape == (5, 3, 32, 32) and samples.is_contiguous()  # .view(N, -1) works downstream


def forward_backward(layout: torch.memory_format) -> tuple[torch.Tensor, dict]:
    """D's logits for a batch of real and generated images, and every weight's gradient of a loss of
    them, with DCGAN.ipynb's networks (one seed) in `layout`."""
    torch.manual_seed(0)
    parts = dcgan.build_training_parts(SETTINGS, torch.device("cpu"), 3)
    G, D = parts["G"].to(memory_format=layout), parts["D"].to(memory_format=layout)
    noise = torch.Generator().manual_seed(1)
    real = torch.rand(16, 3, 32, 32, generator=noise) * 2 - 1
    logits = D(torch.cat([real, G(torch.randn(16, SETTINGS["latent_dim"], generator=noise))]))
    torch.nn.functional.softplus(-logits).mean().backward()
    return logits, {f"{k}.{n}": p.grad for k, net in (("G", G), ("D", D)) for n, p in net.named_parameters()}


def test_channels_last_networks_compute_the_same_function_and_gradients():
    # The same numbers to float32 rounding. (Not the same weights after a few Adam steps: Adam's
    # first steps divide each gradient by its own size, so rounding in near-zero gradients flips updates
    # of the full learning rate; two runs then differ as two thread counts do, not in what they train.)
    usual_logits, usual_grads = forward_backward(torch.contiguous_format)
    last_logits, last_grads = forward_backward(torch.channels_last)
    torch.testing.assert_close(last_logits, usual_logits, rtol=1e-4, atol=1e-5)
    for name, grad in usual_grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(last_grads[name], grad, rtol=1e-3, atol=1e-4 * scale, msg=name)
