"""Memory layout of the convolutional networks (channels_last on a CPU) and of the optimizer state a
checkpoint brings back: the layout may change the speed, never what is computed."""

from __future__ import annotations

import pytest
import torch

import gan_speed as gs
import gan_utils as gu
from conftest import REPO_ROOT

DCGAN = REPO_ROOT / "DCGAN.ipynb"
SETTINGS = gu.notebook_defaults(DCGAN, gu.DCGAN_PARAMETER_RULES)


@pytest.fixture(scope="module")
def nb():
    return gu.load_notebook_definitions(DCGAN)


def conv_weights(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in net.parameters() if p.dim() == 4]


def test_convolutional_weights_lie_channels_last_on_a_cpu_and_unchanged_elsewhere():
    assert gs.conv_memory_format(torch.device("cpu")) is torch.channels_last
    assert gs.conv_memory_format(torch.device("cuda")) is torch.preserve_format
    assert gs.conv_memory_format("mps") is torch.preserve_format


def test_dcgan_parts_are_channels_last_and_samples_come_out_in_the_usual_layout(nb):
    parts = nb["build_training_parts"](SETTINGS, torch.device("cpu"), 3)
    for key in ("G", "D", "G_ema"):
        weights = conv_weights(parts[key])
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights), key
    samples = parts["G_ema"](torch.randn(5, SETTINGS["latent_dim"]))
    assert samples.shape == (5, 3, 32, 32) and samples.is_contiguous()  # .view(N, -1) works downstream


def forward_backward(nb, layout: torch.memory_format) -> tuple[torch.Tensor, dict]:
    """D's logits for a batch of real and generated images, and every weight's gradient of a loss of
    them, with DCGAN.ipynb's networks (one seed) in `layout`."""
    torch.manual_seed(0)
    parts = nb["build_training_parts"](SETTINGS, torch.device("cpu"), 3)
    G, D = parts["G"].to(memory_format=layout), parts["D"].to(memory_format=layout)
    noise = torch.Generator().manual_seed(1)
    real = torch.rand(16, 3, 32, 32, generator=noise) * 2 - 1
    logits = D(torch.cat([real, G(torch.randn(16, SETTINGS["latent_dim"], generator=noise))]))
    torch.nn.functional.softplus(-logits).mean().backward()
    return logits, {f"{k}.{n}": p.grad for k, net in (("G", G), ("D", D)) for n, p in net.named_parameters()}


def test_channels_last_networks_compute_the_same_function_and_gradients(nb):
    # The same numbers to float32 rounding. (Not the same weights after a few Adam steps: Adam's
    # first steps divide each gradient by its own size, so rounding in near-zero gradients flips updates
    # of the full learning rate; two runs then differ as two thread counts do, not in what they train.)
    usual_logits, usual_grads = forward_backward(nb, torch.contiguous_format)
    last_logits, last_grads = forward_backward(nb, torch.channels_last)
    torch.testing.assert_close(last_logits, usual_logits, rtol=1e-4, atol=1e-5)
    for name, grad in usual_grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(last_grads[name], grad, rtol=1e-3, atol=1e-4 * scale, msg=name)


def adam_after_resume(param_layout, saved_layout, restore) -> torch.Tensor:
    """Two fused Adam steps on one 4-d weight; between them the optimizer is saved with its moments in
    `saved_layout` and loaded into a fresh one whose weight lies in `param_layout`, by `restore`."""
    w0, grads = torch.randn(8, 4, 3, 3), [torch.randn(8, 4, 3, 3) for _ in range(2)]
    w = torch.nn.Parameter(w0.contiguous(memory_format=saved_layout))
    opt = torch.optim.Adam([w], lr=0.1, fused=True)
    w.grad = grads[0].contiguous(memory_format=saved_layout)
    opt.step()
    saved = opt.state_dict()
    resumed = torch.nn.Parameter(w.detach().contiguous(memory_format=param_layout))
    opt2 = torch.optim.Adam([resumed], lr=0.1, fused=True)
    restore(opt2, saved)
    resumed.grad = grads[1].contiguous(memory_format=param_layout)  # autograd's grads take the weight's layout
    opt2.step()
    return resumed.detach().contiguous()


def test_a_checkpoint_in_another_layout_resumes_adam_exactly():
    # A CPU checkpoint (channels_last) resumed on a GPU (usual layout), or one from before the layout
    # change resumed on a CPU: the moments must follow the weights, or fused Adam pairs wrong elements.
    def with_restore(opt, saved):
        gu.restore_training_state({"opt": saved, "rng": gu.rng_state(), "history": [], "epoch": 0}, {"opt": opt})

    for param_layout, saved_layout in ((torch.channels_last, torch.contiguous_format),
                                       (torch.contiguous_format, torch.channels_last)):
        torch.manual_seed(0)
        reference = adam_after_resume(saved_layout, saved_layout, torch.optim.Optimizer.load_state_dict)
        torch.manual_seed(0)
        resumed = adam_after_resume(param_layout, saved_layout, with_restore)
        torch.testing.assert_close(resumed, reference, rtol=0, atol=1e-6)


def test_without_the_layout_fix_fused_adam_would_go_wrong():
    # Why lay_out_like_params exists: torch's fused Adam does not check that the layouts agree.
    torch.manual_seed(0)
    reference = adam_after_resume(torch.contiguous_format, torch.contiguous_format, torch.optim.Optimizer.load_state_dict)
    torch.manual_seed(0)
    mismatched = adam_after_resume(torch.channels_last, torch.contiguous_format, torch.optim.Optimizer.load_state_dict)
    assert (mismatched - reference).abs().max() > 1e-3
