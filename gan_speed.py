"""How the training step runs fast on the hardware at hand, without changing what it computes.

* `resolve_matmul_precision`: what `matmul_precision = "auto"` means on this machine (bfloat16 matmuls
  where the CPU has AMX or on a GPU, float32 on a CPU without AMX, where bfloat16 is no faster).
* `resolve_d_hidden`: what `d_hidden = "auto"` means here (D's hidden widths: 1024-512-256 on a GPU or
  a CPU with AMX, 768-384-192 on a CPU without AMX, where a step is FLOP-bound; a resumed run keeps
  the checkpoint's).
* `conv_memory_format`: the layout of a convolutional network's weights (channels_last on a CPU).
* `step_runner`: the notebook's training step either as written (eager, the reference) or captured
  in CUDA graphs (`cuda_graphs = True`): one graph per kind of step, replayed with no Python or kernel
  launch overhead. The notebooks split their step into `step_schedule` (what a step does: a function
  of the epoch and step alone) and `apply_step` (doing it), so both paths run the same code.

Nothing here holds global state: a runner belongs to one run of the training cell.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from run_safety import built_with

# ONEDNN_MAX_CPU_ISA values that leave AMX available (oneDNN's names; anything else caps below it).
_ISA_WITH_AMX = ("ALL", "DEFAULT")


def cpu_has_amx(cpuinfo: str | None = None, max_isa: str | None = None) -> bool:
    """True when oneDNN can use this CPU's AMX tiles for bfloat16 matmuls: /proc/cpuinfo lists the
    `amx_bf16` flag, and ONEDNN_MAX_CPU_ISA (which caps the instructions oneDNN uses) does not cap
    them away. False where the CPU does not say (macOS, Windows): float32 is the safe choice there."""
    if max_isa is None:
        max_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    max_isa = max_isa.strip().upper()
    if max_isa and max_isa not in _ISA_WITH_AMX and "AMX" not in max_isa:
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return "amx_bf16" in cpuinfo.split()


def resolve_matmul_precision(precision: str, device: torch.device, amx: bool | None = None) -> tuple[str, str]:
    """(torch.set_float32_matmul_precision value, why) for the notebook parameter `matmul_precision`.

    "auto" picks "medium" (matmuls in bfloat16 with float32 accumulation) on a GPU and on a CPU with
    AMX, where it is 2-3x faster than float32; "highest" (plain float32) on a CPU without AMX: on an
    AVX-512 BF16 CPU without AMX, bfloat16 matmuls measured 0.9x the speed of float32 ones
    (benchmark.py, docs/experiments.md), so bfloat16 would only cost precision.
    """
    if precision != "auto":
        return precision, "as set"
    device = torch.device(device)
    return {"gpu": ("medium", f"auto: {device.type} device"),
            "amx": ("medium", "auto: this CPU has AMX, which multiplies bfloat16 matrices 2-3x faster than float32"),
            "no_amx": ("highest", "auto: this CPU has no AMX (or ONEDNN_MAX_CPU_ISA caps it), where bfloat16 "
                                  "matmuls are no faster than float32: training in float32"),
            }[_hardware(device, amx)]


def _hardware(device: torch.device, amx: bool | None) -> str:
    """What the "auto" settings go by: "gpu" (any device but the CPU), "amx" (a CPU whose AMX oneDNN
    may use) or "no_amx" (a CPU where a step is bound by float32 matmul FLOPs)."""
    if device.type != "cpu":
        return "gpu"
    return "amx" if (cpu_has_amx() if amx is None else amx) else "no_amx"


# D's hidden-layer widths for `d_hidden = "auto"`: as most reimplementations have it where matmuls are
# cheap, three quarters of that where the step is bound by float32 matmul FLOPs (docs/experiments.md,
# "Narrower networks": 1.37x the images per second there, the same final scores; with AMX only 1.09x,
# for a slightly worse FD, so the wider D stays).
D_HIDDEN_WIDE = [1024, 512, 256]
D_HIDDEN_NARROW = [768, 384, 192]


def resolve_d_hidden(d_hidden, device: torch.device, model_config: dict | None = None,
                     amx: bool | None = None) -> tuple[list[int], str]:
    """(D's hidden widths, why) for the notebook parameter `d_hidden` (a list, or "auto").

    "auto" keeps the widths of the networks `model_config` describes (a checkpoint's settings, or the
    models already built in this kernel): a run resumes with the networks it has, on any machine.
    Otherwise: D_HIDDEN_WIDE on a GPU or a CPU with AMX, D_HIDDEN_NARROW on a CPU without AMX.
    """
    if d_hidden != "auto":
        return list(d_hidden), "as set"
    if model_config is not None:  # its widths are resolved: configs hold what the networks were built with
        return list(built_with(model_config, "d_hidden")), "auto: the widths of the networks being continued"
    device = torch.device(device)
    widths, why = {"gpu": (D_HIDDEN_WIDE, f"a {device.type} device, where a step is bound by kernel launches, not FLOPs"),
                   "amx": (D_HIDDEN_WIDE, "this CPU has AMX, where narrower layers save little time"),
                   "no_amx": (D_HIDDEN_NARROW, "this CPU has no AMX, so each float32 FLOP counts: 3/4 width, "
                                               "22% fewer FLOPs a step, the same scores"),
                   }[_hardware(device, amx)]
    return list(widths), "auto: " + why


def conv_memory_format(device: torch.device) -> torch.memory_format:
    """The memory layout for a convolutional network's weights: channels_last on a CPU, where oneDNN's
    convolutions run in that layout natively (DCGAN.ipynb's step trained 1.17x the images per second,
    docs/experiments.md, "DCGAN on CIFAR-10"); unchanged elsewhere (untimed on GPUs). The weights' layout
    is only how they lie in memory: the networks compute the same function, to float32 rounding."""
    return torch.channels_last if torch.device(device).type == "cpu" else torch.preserve_format


# --------------------------------------------------------------------------------------------
# The training step: eager, or captured in CUDA graphs
# --------------------------------------------------------------------------------------------

class CudaGraphBackend:
    """Captures and replays with torch.cuda.graphs (the real thing; needs a CUDA device)."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)

    def warm_up(self, fn: Callable):
        # Eager steps before a capture run on a side stream, as torch.cuda.graphs asks: lazy
        # initialisation (cuBLAS handles, the allocator's pools) must not happen during capture.
        main = torch.cuda.current_stream(self.stream.device)  # the training device's, not cuda:0's
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            out = fn()
        main.wait_stream(self.stream)
        return out

    def capture(self, fn: Callable):
        # Records fn's kernels without running them. The handle: the graph and fn's outputs, static
        # tensors that every replay overwrites in place.
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            out = fn()
        return graph, out

    @staticmethod
    def replay(handle):
        graph, out = handle
        graph.replay()
        return out


class EagerBackend:
    """Stands in for CUDA graphs on a CPU (tests): "capturing" keeps the function and runs nothing,
    "replaying" runs it again on the same static buffers. Everything around the graphs (which
    buffers are static, when a graph is captured, re-captured or replayed) is then the real code."""

    def __init__(self):
        self.captures = 0

    @staticmethod
    def warm_up(fn: Callable):
        return fn()

    def capture(self, fn: Callable):
        self.captures += 1
        return fn

    @staticmethod
    def replay(handle):
        return handle()


def _captured_tensors(parts: dict) -> list[torch.Tensor]:
    """Every tensor a captured step reads or writes in place besides its static inputs: the networks'
    parameters and buffers and the optimizers' state. A graph holds their addresses; if one is
    replaced (an optimizer's load_state_dict after a resume or a rollback), the graph is stale."""
    tensors = []
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            tensors += list(part.parameters()) + list(part.buffers())
        elif isinstance(part, torch.optim.Optimizer):
            for state in part.state.values():
                tensors += [v for v in state.values() if torch.is_tensor(v)]
    return tensors


def _baked_in(parts: dict, settings: dict) -> tuple:
    """What a capture freezes besides tensors: the settings the step reads and the optimizers'
    learning rates and betas (Python numbers passed to the kernels as they are recorded)."""
    groups = [(g["lr"], tuple(g["betas"])) for part in parts.values() if isinstance(part, torch.optim.Optimizer)
              for g in part.param_groups]
    return tuple(sorted((k, repr(v)) for k, v in settings.items())), tuple(groups)


class CapturedSteps:
    """The notebook's step, replayed from CUDA graphs: `runner(real, epoch, step, steps_per_epoch)`
    returns what `train_step` returns and trains the same way.

    * One graph per kind of step: (G updated?, lazy R1 step?), so up to four. Each kind runs eagerly
      `warmup` times first (these are real training steps, not extra ones), then is captured once
      and replayed from then on.
    * Static inputs: the minibatch (copied into a fixed buffer before each replay) and the EMA's
      lerp weight 1 - beta_t (a 0-d tensor filled before each replay: it changes every step during
      the warm-up of the average). The noise is drawn inside the graph from torch's CUDA generator,
      which graphs advance as eager code does.
    * Re-captured: every graph, when a setting or a learning rate differs from the capture's, or
      when a tensor the graphs write (weights, BatchNorm statistics, Adam's moments) was replaced:
      after a resume or a rollback loads an optimizer's state. Checked at each epoch's first step
      (settings cannot change inside an epoch). A new run of the training cell makes a new runner,
      so a changed setting always starts from fresh graphs anyway.
    """

    def __init__(self, schedule: Callable, apply: Callable, parts: dict, settings: dict,
                 batch_shape: tuple, device: torch.device, backend=None, warmup: int = 3):
        self.schedule, self.apply, self.parts, self.settings = schedule, apply, parts, settings
        self.device = torch.device(device)
        self.backend = backend if backend is not None else CudaGraphBackend(self.device)
        self.warmup = warmup
        self.real = torch.zeros(batch_shape, device=self.device)  # the static minibatch
        self.ema_weight = torch.zeros((), device=self.device)      # the static 1 - beta_t
        self.graphs: dict[tuple, object] = {}                      # kind -> the backend's handle
        self.eager_steps: dict[tuple, int] = {}
        self.fingerprint = None
        if isinstance(self.backend, CudaGraphBackend):
            set_capturable(parts, True)

    def _current_fingerprint(self) -> tuple:
        return _baked_in(self.parts, self.settings), tuple(t.data_ptr() for t in _captured_tensors(self.parts))

    def __call__(self, real: torch.Tensor, epoch: int, step: int, steps_per_epoch: int) -> torch.Tensor:
        update_g, r1, ema_weight = self.schedule(epoch, step, steps_per_epoch, self.settings)
        kind = (update_g, r1, ema_weight is not None)
        if real.shape != self.real.shape:
            raise ValueError(f"a captured step takes minibatches of shape {tuple(self.real.shape)}, "
                             f"got {tuple(real.shape)}: re-run the training cell after changing batch_size")
        eager_so_far = self.eager_steps.get(kind, 0)
        if eager_so_far < self.warmup:
            self.eager_steps[kind] = eager_so_far + 1
            return self.backend.warm_up(lambda: self.apply(self.parts, real, self.settings, update_g, r1, ema_weight))
        if step == 1 or kind not in self.graphs:  # checked at each epoch's start, and before a capture
            fingerprint = self._current_fingerprint()
            if fingerprint != self.fingerprint:  # something the graphs baked in changed: capture anew
                self.graphs.clear()
                self.fingerprint = fingerprint
        self.real.copy_(real)
        if ema_weight is not None:
            self.ema_weight.fill_(ema_weight)
        if kind not in self.graphs:
            weight = self.ema_weight if ema_weight is not None else None
            self.graphs[kind] = self.backend.capture(
                lambda: self.apply(self.parts, self.real, self.settings, update_g, r1, weight))
        return self.backend.replay(self.graphs[kind])


def set_capturable(parts: dict, capturable: bool) -> None:
    """Adam's `capturable` flag on every optimizer of `parts`: True keeps its step count and bias
    corrections on the device, as a CUDA graph needs; off CUDA, Adam's foreach kernel (the one used
    on MPS) refuses True. The flag travels in checkpoints and snapshots, so each training run sets
    it for the step it runs."""
    for part in parts.values():
        if isinstance(part, torch.optim.Optimizer):
            for group in part.param_groups:
                group["capturable"] = capturable


def step_runner(nb: dict, parts: dict, settings: dict, batch_shape: tuple, device: torch.device,
                cuda_graphs: bool, report: Callable[[str], None] = print) -> Callable:
    """The training step for one run of the training cell: `run(real, epoch, step, steps_per_epoch)`.

    `nb` holds the notebook's `train_step`, `step_schedule` and `apply_step`. With `cuda_graphs` on a
    CUDA device, the step is captured (CapturedSteps); otherwise it is the notebook's `train_step`
    as written. `cuda_graphs` on another device falls back to it, and says so."""
    device = torch.device(device)
    if cuda_graphs and device.type == "cuda":
        return CapturedSteps(nb["step_schedule"], nb["apply_step"], parts, settings, batch_shape, device)
    set_capturable(parts, False)  # e.g. resuming on MPS from a checkpoint of a captured GPU run
    if cuda_graphs:
        report(f"cuda_graphs = True needs a CUDA device; this run trains on {device.type}, so the step "
               "runs as written (eager). Set cuda_graphs = False to silence this.")

    def run(real, epoch, step, steps_per_epoch):
        return nb["train_step"](parts, real, epoch, step, steps_per_epoch, settings)

    return run
