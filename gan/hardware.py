"""Choices made by the hardware at hand, none of which changes what a step computes.

* The CPU: `cpu_has_amx`, and `cpu_description` (the model, AMX / AVX-512 / AVX2 only, any cap), which
  every run records in config.json so that its times name the machine.
* `resolve_matmul_precision`: what `matmul_precision = "auto"` means here (bfloat16 matmuls where the
  CPU has AMX or on a GPU, float32 on a CPU without AMX, where bfloat16 is no faster). Nothing here
  changes the networks: they are the same on every machine.
* `conv_memory_format`: the layout of a convolutional network's weights (channels_last on a CPU).
* `pick_device`, `adam_kernel` (fused Adam where it exists), `float32_matmul_precision` (the block
  the training runs in).
* `step_runner`: the training step either as written (eager, the reference) or captured in CUDA
  graphs (`cuda_graphs = True`): one graph per kind of step, replayed with no Python or kernel launch
  overhead. The step is split into `step_schedule` (what a step does: a function of the epoch and
  step alone) and `apply_step` (doing it), so both paths run the same code.

Nothing here holds global state: a runner belongs to one run of the training cell.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Callable

import torch

from gan.errors import ParameterError

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


def cpu_model() -> str:
    """The CPU's model name (as lscpu shows it), or the platform's best guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description(cpuinfo: str | None = None, environ=os.environ) -> str:
    """The CPU as timings must name it: its model, the widest vector instructions it has (AMX,
    AVX-512 or AVX2 only), and any cap on what PyTorch may use (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = set(cpuinfo.split())
    isa = ("AMX" if "amx_bf16" in flags else "AVX-512, no AMX" if "avx512f" in flags
           else "AVX2 only" if "avx2" in flags else "no AVX2")
    caps = [f"{name}={environ[name]}" for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if environ.get(name)]
    return f"{cpu_model()} ({isa}{'; capped: ' + ', '.join(caps) if caps else ''})"


def resolve_matmul_precision(precision: str, device: torch.device, amx: bool | None = None) -> tuple[str, str]:
    """(torch.set_float32_matmul_precision value, why) for the notebook parameter `matmul_precision`.

    "auto" picks "medium" (matmuls in bfloat16 with float32 accumulation) on a GPU and on a CPU with
    AMX, where it is 2-3x faster than float32; "highest" (plain float32) on a CPU without AMX: on an
    AVX-512 BF16 CPU without AMX, bfloat16 matmuls measured 0.9x the speed of float32 ones
    (scripts/benchmark.py, docs/experiments.md), so bfloat16 would only cost precision.
    """
    if precision != "auto":
        return precision, "as set"
    device = torch.device(device)
    return {"gpu": ("medium", f"auto: {device.type} device"),
            "amx": ("medium", "auto: this CPU has AMX, which multiplies bfloat16 matrices 2-3x faster than float32"),
            "no_amx": ("highest", "auto: this CPU has no AMX (or ONEDNN_MAX_CPU_ISA caps it), where bfloat16 "
                                  "matmuls are no faster than float32: training in float32"),
            }[hardware_kind(device, amx)]


def hardware_kind(device: torch.device, amx: bool | None) -> str:
    """What the "auto" settings go by: "gpu" (any device but the CPU), "amx" (a CPU whose AMX oneDNN
    may use) or "no_amx" (a CPU where a step is bound by float32 matmul FLOPs)."""
    if device.type != "cpu":
        return "gpu"
    return "amx" if (cpu_has_amx() if amx is None else amx) else "no_amx"


def conv_memory_format(device: torch.device) -> torch.memory_format:
    """The memory layout for a convolutional network's weights: channels_last on a CPU, where oneDNN's
    convolutions run in that layout natively (DCGAN.ipynb's step trained 1.17x the images per second,
    docs/experiments.md, "DCGAN on CIFAR-10"); unchanged elsewhere (untimed on GPUs). The weights' layout
    is only how they lie in memory: the networks compute the same function, to float32 rounding."""
    return torch.channels_last if torch.device(device).type == "cpu" else torch.preserve_format


# --------------------------------------------------------------------------------------------
# The device, and the kernels that run fastest on it
# --------------------------------------------------------------------------------------------

def mps_available() -> bool:
    """Apple's GPU backend (older PyTorch builds lack torch.backends.mps altogether)."""
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' -> cuda if available, then mps, then cpu. A device that is not there is an error."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"device = {requested!r} but PyTorch sees no CUDA GPU here: use 'auto' or 'cpu'")
    if requested == "mps" and not mps_available():
        raise ParameterError("device = 'mps' but MPS is not available here: use 'auto' or 'cpu'")
    return torch.device(requested)


def adam_kernel(device: torch.device) -> dict:
    """Adam's fastest implementation here: the fused kernel (all tensors in one pass) on CPU and
    CUDA, the foreach one elsewhere (e.g. MPS). Pass as torch.optim.Adam(..., **adam_kernel(dev))."""
    return {"fused": True} if torch.device(device).type in ("cpu", "cuda") else {"foreach": True}


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    """torch.set_float32_matmul_precision(precision) inside the block; the previous setting after it.

    "highest" is plain float32. "high" lets NVIDIA GPUs use TF32; "medium" lets CPUs with AMX (and
    GPUs) compute float32 matmuls in bfloat16 with float32 accumulation: 2-3x faster matmuls, about
    3 significant digits. The notebook trains inside this block and evaluates outside it, so Parzen
    and the Frechet distance always see full float32 matmuls.
    """
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


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


def step_runner(method: dict, parts: dict, settings: dict, batch_shape: tuple, device: torch.device,
                cuda_graphs: bool, report: Callable[[str], None] = print) -> Callable:
    """The training step for one run of the training cell: `run(real, epoch, step, steps_per_epoch)`.

    `method` holds `train_step`, `step_schedule` and `apply_step`: the notebook's globals() (so that a
    cell that redefines one is what trains) or vars(gan.vanilla_gan). With `cuda_graphs` on a
    CUDA device, the step is captured (CapturedSteps); otherwise it is the notebook's `train_step`
    as written. `cuda_graphs` on another device falls back to it, and says so."""
    device = torch.device(device)
    if cuda_graphs and device.type == "cuda":
        return CapturedSteps(method["step_schedule"], method["apply_step"], parts, settings, batch_shape, device)
    set_capturable(parts, False)  # e.g. resuming on MPS from a checkpoint of a captured GPU run
    if cuda_graphs:
        report(f"cuda_graphs = True needs a CUDA device; this run trains on {device.type}, so the step "
               "runs as written (eager). Set cuda_graphs = False to silence this.")

    def run(real, epoch, step, steps_per_epoch):
        return method["train_step"](parts, real, epoch, step, steps_per_epoch, settings)

    return run
