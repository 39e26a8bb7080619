"""The notebooks' settings: what each may be, and every check of them, in one place.

* The rules: `PARAMETER_RULES` (Vanilla_GAN.ipynb) and `DCGAN_PARAMETER_RULES` (DCGAN.ipynb), name ->
  (check, the allowed values in words). The notebooks' parameters cells hold the defaults.
* `checked`: the one call a notebook makes to read its settings from its globals() into one dict and
  check them (papermill's injected names, names typed in the wrong case, the data's size, settings
  the cells above already used). It returns the dict every later cell, the step and the checkpoint use.
* Whether a checkpoint's settings fit (`check_checkpoint_fits`), including checkpoints made before a
  setting existed or after one retired.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import os
from pathlib import Path

import torch

from gan.errors import CheckpointError, ParameterError


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _non_negative_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _positive_number(v):
    return _non_negative_number(v) and v > 0


def _unit_interval_open(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1


def _layer_widths(v):
    return isinstance(v, (list, tuple)) and len(v) >= 1 and all(_positive_int(w) for w in v)


def _is_bool(v):
    return isinstance(v, bool)


def _is_str(v):
    return isinstance(v, str)


# The values of torch.set_float32_matmul_precision (notebook parameter `matmul_precision`), and "auto":
# chosen by a timing on the machine itself (hardware.resolve_matmul_precision).
MATMUL_PRECISIONS = ("auto", "highest", "high", "medium")
# The game's losses (Vanilla_GAN.ipynb, "The losses"): the paper's binary cross-entropy, hinge, least squares.
LOSSES = ("bce", "hinge", "least_squares")

# name -> (check, the allowed values in words). The notebook's parameters cell holds the defaults.
PARAMETER_RULES = {
    "data_dir": (_is_str, "a directory path (string) that holds or will hold MNIST/raw/"),
    "run_dir": (_is_str, "a directory path (string), or '' for runs/<date-time>/"),
    "device": (lambda v: v in ("auto", "cpu", "mps") or (isinstance(v, str) and v.startswith("cuda")),
               "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    # NumPy's seed must fit 32 bits (np.random.seed(2**32) raises), so seed_everything could not take more.
    "seed": (lambda v: _non_negative_int(v) and v < 2 ** 32, "an integer from 0 to 2**32-1 (4294967295)"),
    "epochs": (_positive_int, "an integer >= 1"),
    "batch_size": (_positive_int, "an integer >= 1"),
    "train_subset": (_non_negative_int, "0 (all 50,000 training images) or a positive integer"),
    "latent_dim": (_positive_int, "an integer >= 1"),
    "g_hidden": (_layer_widths, "a list of hidden-layer widths (integers >= 1), e.g. [256, 512, 1024]; "
                                "in make run's PARAMS: -p g_hidden '[256, 512, 1024]' (papermill itself: -y 'g_hidden: [256, 512, 1024]')"),
    "d_hidden": (_layer_widths,
                 "a list of hidden-layer widths (integers >= 1), e.g. [768, 384, 192] (the default, on every machine); "
                 "in make run's PARAMS: -p d_hidden '[1024, 512, 256]' (papermill itself: -y 'd_hidden: [1024, 512, 256]')"),
    "g_batchnorm": (_is_bool, "True or False"),
    "d_dropout": (_unit_interval_open, "a number in [0, 1)"),
    "g_loss": (lambda v: v in ("non_saturating", "minimax"),
               "'non_saturating' or 'minimax' (the hinge and least-squares games: the setting `loss`)"),
    "loss": (lambda v: v in LOSSES, "'bce' (the paper's game), 'hinge' or 'least_squares'"),
    "d_steps": (_positive_int, "an integer >= 1"),
    "label_smoothing": (lambda v: _unit_interval_open(v) and v < 0.5, "a number in [0, 0.5)"),
    "r1_gamma": (_non_negative_number, "a number >= 0; 0 turns the penalty off"),
    "r1_every": (_positive_int, "an integer >= 1 (steps)"),
    "lr_g": (_positive_number, "a number > 0"),
    "lr_d": (_positive_number, "a number > 0"),
    "beta1": (_unit_interval_open, "a number in [0, 1)"),
    "beta2": (_unit_interval_open, "a number in [0, 1)"),
    "ema_decay": (_unit_interval_open, "a number in [0, 1); 0 turns the EMA off"),
    "checkpoint_every": (_positive_int, "an integer >= 1 (epochs)"),
    "resume": (_is_str, "'' or the path of a checkpoint.pt"),
    "overwrite": (_is_bool, "True or False; True deletes the previous run in run_dir first"),
    "metrics_every": (_non_negative_int, "0 (off) or an integer >= 1 (epochs)"),
    "metrics_samples": (_positive_int, "an integer >= 1"),
    "eval_samples": (_non_negative_int, "0 (skip the final evaluation) or an integer >= 1"),
    "log_every": (_positive_int, "an integer >= 1 (steps)"),
    "matmul_precision": (lambda v: v in MATMUL_PRECISIONS, "'auto', 'highest', 'high' or 'medium'"),
    "cuda_graphs": (_is_bool, "True or False; True replays the training step as CUDA graphs on a CUDA GPU"),
}

# DCGAN.ipynb's parameters: the same names where the meaning is the same, its own for the data and
# the convolutional networks (the MLPs' g_hidden, d_hidden, g_batchnorm and d_dropout are not settings there).
DCGAN_PARAMETER_RULES = {
    **{k: v for k, v in PARAMETER_RULES.items() if k not in ("g_hidden", "d_hidden", "g_batchnorm", "d_dropout")},
    "dataset": (lambda v: isinstance(v, str) and bool(v), "'cifar10', 'mnist' or the path of a folder of images"),
    "data_dir": (_is_str, "a directory path (string) where 'cifar10' and 'mnist' are found or downloaded"),
    "train_subset": (_non_negative_int, "0 (every training image) or a positive integer"),
    "image_size": (lambda v: v in (32, 64), "32 or 64 (pixels)"),
    "g_width": (_positive_int, "an integer >= 1 (channels of G's last hidden layer)"),
    "d_width": (_positive_int, "an integer >= 1 (channels of D's first layer)"),
    "train_minutes": (_non_negative_number, "a number of minutes >= 0; 0 trains every one of `epochs`"),
    "inception_metrics": (lambda v: v == "auto" or _is_bool(v),
                          "'auto' (on a CUDA GPU only), True (on a CPU too: 20-35 min for 10,000 samples on 2 cores) or False"),
}


# Parameters that older versions of the notebook had: name -> why it went and what to use instead.
# A papermill `-p` with one of them is refused with this reason; a checkpoint that recorded one still
# resumes (retired_settings() says what no longer applies).
RETIRED_PARAMETERS = {
    "amp": "bfloat16 autocast had no measured gain over matmul_precision = 'medium', which stays",
    "compile": "torch.compile trained slower than eager, on our CPU and on an H100 (docs/experiments.md)",
    "beta1_g": "one beta1 now sets both networks' Adam beta1",
    "beta1_d": "one beta1 now sets both networks' Adam beta1",
    "beta2_g": "one beta2 now sets both networks' Adam beta2",
    "beta2_d": "one beta2 now sets both networks' Adam beta2",
}

# Settings added later, with the value that training had before them: a checkpoint that predates one
# trained with that value (retired_settings() says when it continues with another).
VALUE_BEFORE_SETTING = {"beta2": 0.999, "loss": "bce"}


def rules_for(notebook: str | Path) -> dict:
    """The parameter rules of `notebook` (a path or name): DCGAN.ipynb's, else Vanilla_GAN.ipynb's."""
    return DCGAN_PARAMETER_RULES if Path(notebook).name == "DCGAN.ipynb" else PARAMETER_RULES


def _literal(text: str):
    """`text` as papermill's command line types a `-p` value (True/False/None, int, float, str), and a
    list in brackets read as JSON (papermill's own command line needs -y for a list)."""
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def typed_parameter(name: str, text: str, rules: dict = PARAMETER_RULES):
    """A `-p name value` from a command line, typed by the parameter's own rule: a path or a name
    (run_dir = '2024_12_01', dataset = '2024', run_dir = '007') stays the string as typed, a number or a
    list is parsed. A value that its rule refuses either way is returned as papermill would type it, for
    validate_parameters() to name; so is an unknown name."""
    value = _literal(text)
    if name in rules and not rules[name][0](value) and rules[name][0](text):
        return text
    return value


RUN_BOOKKEEPING = ("resume", "run_dir", "overwrite")  # where a run reads and writes, not how it trains


def settings_changed(checkpoint_config: dict, config: dict) -> dict:
    """{name: (value in the checkpoint, value now)} for each setting that differs, besides where the
    run reads and writes (RUN_BOOKKEEPING: a resume always changes them); a setting added after the
    checkpoint was made counts with the value it trained with (VALUE_BEFORE_SETTING)."""
    saved = {**VALUE_BEFORE_SETTING, **checkpoint_config}
    return {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v and k not in RUN_BOOKKEEPING}


def retired_settings(checkpoint_config: dict, config: dict) -> list[str]:
    """Notes for resuming a checkpoint made before some parameters were retired or added: one for each
    retired setting it recorded with a value other than what training now does, and one for each later
    setting whose value now differs from the one it trained with."""
    now = {"amp": False, "compile": False, "beta1_g": config["beta1"], "beta1_d": config["beta1"],
           "beta2_g": config["beta2"], "beta2_d": config["beta2"]}
    notes = [f"note: this checkpoint was trained with {name} = {checkpoint_config[name]!r}, a setting that "
             f"no longer exists ({why}); training continues with {now[name]!r}."
             for name, why in RETIRED_PARAMETERS.items()
             if name in checkpoint_config and checkpoint_config[name] != now[name]]
    notes += [f"note: this checkpoint predates the {name} setting and was trained with {name} = {before!r}; "
              f"training continues with {name} = {config[name]!r} (set {name} = {before!r} to keep it as it was)."
              for name, before in VALUE_BEFORE_SETTING.items()
              if name not in checkpoint_config and config[name] != before]
    return notes


def parameters_from(namespace: dict, rules: dict = PARAMETER_RULES) -> dict:
    """Pick the notebook's parameters (the names in `rules`) out of `namespace` (its globals())."""
    missing = [name for name in rules if name not in namespace]
    if missing:
        raise ParameterError(f"the parameters cell does not define {', '.join(missing)}; "
                             "restore them from the repository's copy of the notebook.")
    return {name: namespace[name] for name in rules}


def injected_parameters(history: list[str]) -> dict:
    """The names and values papermill injected, read from the kernel's input history (`In`).

    parameters_from() picks known names only, so a misspelt `-p epoch 5` would otherwise be
    silently ignored; validate_parameters() rejects the unknown name with a did-you-mean.
    """
    injected = [src for src in history if src.lstrip().startswith("# Parameters")]
    if not injected:
        return {}
    values = {}
    for node in ast.parse(injected[-1]).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                values[node.targets[0].id] = ast.unparse(node.value)
    return values


def misspelt_parameters(namespace: dict, rules: dict = PARAMETER_RULES) -> dict:
    """Names in `namespace` (the notebook's globals()) that differ from a parameter only in case, such
    as `lr_D = 1e-4` typed in a new cell: the notebook reads `lr_d`, so it would be ignored without a
    word. validate_parameters() then names each as an unknown parameter and says which one was meant."""
    lowered = {name.lower() for name in rules}
    return {k: v for k, v in namespace.items()
            if k not in rules and not k.startswith("_") and k.lower() in lowered
            and isinstance(v, (bool, int, float, str, list, tuple, type(None)))}


def validate_parameters(config: dict, rules: dict = PARAMETER_RULES) -> None:
    """Check every parameter against `rules` before any work; one error lists each bad one and what
    it may be."""
    problems = []
    for name, value in config.items():
        if name in RETIRED_PARAMETERS:
            problems.append(f"{name} is no longer a parameter: {RETIRED_PARAMETERS[name]}; drop it")
            continue
        if name not in rules:
            close = [r for r in rules if r.lower() == name.lower()] or difflib.get_close_matches(name, rules, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown parameter {name!r}{hint}")
            continue
        check, allowed = rules[name]
        if not check(value):
            problems.append(f"{name} = {value!r} is not allowed: use {allowed}")
    problems += _loss_conflicts(config)
    if config.get("resume") and not Path(config["resume"]).expanduser().is_file():
        problems.append(f"resume = {config['resume']!r}: no such file; use '' to start afresh or "
                        "the path of a run's checkpoint.pt")
    if problems:
        raise ParameterError("bad parameters:\n  - " + "\n  - ".join(problems))


def _loss_conflicts(config: dict) -> list[str]:
    """Settings that only the BCE game reads, set with another `loss` (they would be silently ignored)."""
    loss = config.get("loss", "bce")
    if loss == "bce" or loss not in LOSSES:
        return []
    problems = []
    if config.get("g_loss", "non_saturating") != "non_saturating":
        problems.append(f"g_loss = {config['g_loss']!r} is a loss of the BCE game; loss = {loss!r} has its own "
                        "for G: set loss = 'bce' or g_loss = 'non_saturating'")
    if loss == "hinge" and config.get("label_smoothing", 0.0):
        problems.append(f"label_smoothing = {config['label_smoothing']!r} has no meaning for the hinge loss's "
                        "margins: set it to 0.0, or loss = 'bce' or 'least_squares' (real target 1 - it)")
    return problems


# The minimum sample counts of the metrics (gan.metrics), found by reading the code and trying:
# the Frechet distance needs a covariance (torch.cov of 1 sample is NaN and eigh then fails), and
# precision/recall look up each point's k-th nearest neighbour besides itself (topk(k + 1), k = 3).
FD_MIN_SAMPLES = 2
KNN_MIN_SAMPLES = 3 + 1


# Settings that the cells before training used once (to load the data, pick the device, claim the
# run directory): changed in a new cell, re-running the training cell alone could not apply them.
SETUP_SETTINGS = ("data_dir", "dataset", "image_size", "train_subset", "device", "run_dir", "resume")


def check_setup_unchanged(applied: dict, config: dict) -> None:
    """ParameterError naming each SETUP_SETTINGS value that differs between `applied` (what the
    earlier cells used) and `config` (the parameters now), instead of training on without them."""
    changed = [f"{k}: {applied[k]!r} -> {config[k]!r}" for k in SETUP_SETTINGS
               if k in applied and k in config and applied[k] != config[k]]
    if changed:
        raise ParameterError(
            "these settings were used by the cells before training, so re-running the training cell "
            f"cannot apply them: {'; '.join(changed)}. Set them back, or restart the kernel and run the "
            "notebook from the top with the new values (to continue this run there, set resume to its "
            "checkpoint).")


def validate_against_data(config: dict, n_train: int) -> None:
    """Check the settings that depend on the size of the training set, after loading it and before
    any work. One ParameterError lists every conflict with the range allowed for this data: settings
    that would train nothing (G never updated, the R1 penalty never applied) or crash an epoch later."""
    bs, steps = config["batch_size"], n_train // config["batch_size"]
    data = f"{n_train:,} training images (train_subset = {config.get('train_subset', 0)})"
    min_bs = 2 if config.get("g_batchnorm", True) else 1  # DCGAN's G always has BatchNorm
    problems = []
    if steps == 0:
        problems.append(f"batch_size = {bs} is larger than the training set, {data}: use a batch_size "
                        f"from {min_bs} to {n_train}, or more training images (train_subset = 0 for all)")
    elif bs < min_bs:
        switch = "g_batchnorm = True" if "g_batchnorm" in config else "G's BatchNorm"  # DCGAN's has no switch
        problems.append(f"batch_size = {bs} with {switch}: BatchNorm needs at least 2 images per batch; use "
                        f"a batch_size from 2 to {n_train}" + (", or g_batchnorm = False" if "g_batchnorm" in config else ""))
    if steps and config["d_steps"] > steps:
        problems.append(f"d_steps = {config['d_steps']} but an epoch has only {steps} steps ({n_train:,} "
                        f"images // batch_size {bs}): G is updated every d_steps steps and would never "
                        f"train; use d_steps from 1 to {steps}, or a smaller batch_size")
    if steps and config.get("r1_gamma", 0) > 0 and config["r1_every"] > steps:
        problems.append(f"r1_every = {config['r1_every']} but an epoch has only {steps} steps: the R1 "
                        f"penalty would never be applied; use r1_every from 1 to {steps}, or r1_gamma = 0 "
                        "to turn it off")
    if config.get("metrics_every") and config["metrics_samples"] < FD_MIN_SAMPLES:
        problems.append(f"metrics_samples = {config['metrics_samples']}: the Frechet distance needs the "
                        f"covariance of at least {FD_MIN_SAMPLES} samples; use metrics_samples >= "
                        f"{FD_MIN_SAMPLES} (2,000 by default: fewer bias it upward), or metrics_every = 0")
    evals = config.get("eval_samples", 0)
    if 0 < evals < KNN_MIN_SAMPLES:
        problems.append(f"eval_samples = {evals}: precision and recall (k-nearest neighbours, k = 3) "
                        f"need at least {KNN_MIN_SAMPLES} samples; use eval_samples >= {KNN_MIN_SAMPLES}, "
                        "or 0 to skip the final evaluation")
    if evals and n_train < 2 * KNN_MIN_SAMPLES:
        problems.append(f"eval_samples = {evals} with only {data}: the final evaluation scores half of "
                        f"the training images as real samples and needs {KNN_MIN_SAMPLES} in each half; "
                        f"use train_subset >= {2 * KNN_MIN_SAMPLES} (or 0 for all), or eval_samples = 0")
    if problems:
        raise ParameterError("settings that do not fit the data:\n  - " + "\n  - ".join(problems))


def machine_memory() -> int | None:
    """The machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


# The most memory one part of a run (the samples scored at once, the networks with their optimizer
# state) may plan to take: the data, the other part and the machine's other work need the rest.
MEMORY_SHARE = 0.5
# Bytes a float32 number of a network costs in training: the weight, its gradient, Adam's two
# moments, and G's moving average (counted for D too: a bound, not a measurement).
BYTES_PER_PARAMETER = 4 * 5
# A sample's float32 pixels, and the two copies the scores make of it (flattened, and in [0, 1]).
BYTES_PER_SAMPLE_PIXEL = 4 * 3


def parameter_count(config: dict, rules: dict = PARAMETER_RULES) -> int:
    """The number of parameters of G and D as `config` would build them, counted on PyTorch's meta
    device (shapes only: no memory is taken, however wide the layers)."""
    with torch.device("meta"):
        if rules is DCGAN_PARAMETER_RULES:
            from gan import dcgan
            size = config["image_size"]
            nets = (dcgan.Generator(config["latent_dim"], config["g_width"], size),
                    dcgan.Discriminator(config["d_width"], size))
        else:
            from gan import vanilla_gan
            nets = (vanilla_gan.Generator(config["latent_dim"], config["g_hidden"], config["g_batchnorm"]),
                    vanilla_gan.Discriminator(config["d_hidden"]))
    return sum(p.numel() for net in nets for p in net.parameters())


def validate_memory(config: dict, rules: dict = PARAMETER_RULES, memory: int | None = None) -> None:
    """ParameterError for sample counts and network widths that could not fit in this machine's
    memory (`memory` bytes; by default its physical memory), found before anything is written rather
    than at an allocation after training or in the first epoch's scores. Call it after
    validate_parameters (it needs valid values)."""
    memory = memory or machine_memory()
    if memory is None:
        return
    budget, gib = memory * MEMORY_SHARE, memory / 2 ** 30
    pixels = 3 * config["image_size"] ** 2 if rules is DCGAN_PARAMETER_RULES else 28 * 28
    per_sample, problems = pixels * BYTES_PER_SAMPLE_PIXEL, []
    for name in ("metrics_samples", "eval_samples"):
        n = config.get(name, 0)
        if n * per_sample > budget:
            problems.append(f"{name} = {n:,} needs about {n * per_sample / 2 ** 30:,.1f} GiB for its samples, more "
                            f"than half of this machine's {gib:,.1f} GiB: use at most {int(budget // per_sample):,}")
    try:
        count = parameter_count(config, rules)
    except (RuntimeError, ValueError, OverflowError) as exc:  # a width too large even to describe a shape
        problems.append(f"the networks' widths cannot be built ({type(exc).__name__}: {exc}); use smaller widths")
    else:
        if count * BYTES_PER_PARAMETER > budget:
            widths = "g_width, d_width" if rules is DCGAN_PARAMETER_RULES else "g_hidden, d_hidden"
            problems.append(f"latent_dim and the widths ({widths}) make networks of {count:,} parameters, about "
                            f"{count * BYTES_PER_PARAMETER / 2 ** 30:,.1f} GiB to train, more than half of this "
                            f"machine's {gib:,.1f} GiB: use smaller widths")
    if problems:
        raise ParameterError("settings too large for this machine's memory:\n  - " + "\n  - ".join(problems))


def nothing_to_train_message(epochs: int, epochs_done: int) -> str | None:
    """What the training cell says when a resumed run already has `epochs` epochs (None otherwise):
    the later cells still run on the loaded models, so a finished run can be re-evaluated."""
    if epochs > epochs_done:
        return None
    return (f"nothing to train: epochs ({epochs}) <= epochs done ({epochs_done}); raise epochs to continue")


def epochs_that_fit(epochs: int, train_minutes: float, first_epoch_seconds: float) -> tuple[int, str | None]:
    """How many of `epochs` fit in `train_minutes` at the pace of a fresh run's first epoch (its steps
    and its scores), at least 1, with the line that says so; (epochs, None) when all fit or
    train_minutes is 0. No setting of the step depends on the number of epochs, so a run cut to N
    epochs is the first N epochs of the full run."""
    fit = max(1, int(train_minutes * 60 // first_epoch_seconds)) if train_minutes else epochs
    if fit >= epochs:
        return epochs, None
    return fit, (f"training {fit} of the {epochs} epochs: the first took {first_epoch_seconds:.0f} s on this machine, so "
                 f"{epochs} would take {epochs * first_epoch_seconds / 60:.0f} min, more than train_minutes = "
                 f"{train_minutes:g}. To train all {epochs}: set train_minutes = 0 (-p train_minutes 0), or resume "
                 f"this run later with -p epochs {epochs}.")


# Where and how a run computes, not what it trains: a resumed run takes these as they are set now
# (another machine, another data location, another precision), everything else from its checkpoint.
HOW_AND_WHERE = ("data_dir", "run_dir", "resume", "overwrite", "device", "matmul_precision", "cuda_graphs")


def notebook_defaults(rules: dict = PARAMETER_RULES) -> dict:
    """The defaults of the notebook whose rules are `rules`: its parameters cell, as exported."""
    if rules is DCGAN_PARAMETER_RULES:
        from gan.dcgan import notebook_parameters
    else:
        from gan.vanilla_gan import notebook_parameters
    return notebook_parameters()


def set_by_user(config: dict, namespace: dict, defaults: dict) -> set[str]:
    """The settings the user chose for this run: the names papermill injected (`-p`), and any whose
    value differs from the notebook's default (edited in the parameters cell, or set in a new cell)."""
    injected = injected_parameters(namespace.get("In", []))
    return set(injected) | {k for k, v in config.items() if k in defaults and v != defaults[k]}


def resumed(config: dict, checkpoint_config: dict, namespace: dict,
            rules: dict = PARAMETER_RULES) -> tuple[dict, str]:
    """(settings, one line saying so) for a run resumed from a checkpoint with `checkpoint_config`:
    the run continues with its own settings (its learning rates, its train_subset, DCGAN's dataset),
    and only those the user set for this run (set_by_user) replace them; where and how it computes
    (HOW_AND_WHERE) are always as set now. A setting the checkpoint predates keeps its value now."""
    check_same_notebook(checkpoint_config, config)
    mine = set_by_user(config, namespace, notebook_defaults(rules))
    kept = {k: checkpoint_config[k] for k in config
            if k in checkpoint_config and k not in mine and k not in HOW_AND_WHERE}
    resumed_config = {**config, **kept}
    validate_parameters(resumed_config, rules)  # an older version's checkpoint may hold a value now refused
    changed = settings_changed(checkpoint_config, resumed_config)
    changes = ", ".join(f"{k} {was!r} -> {now!r}" for k, (was, now) in changed.items()
                        if k not in HOW_AND_WHERE)
    note = "with the run's own settings" + (f", except those set for this run: {changes}" if changes else "")
    return resumed_config, note


def checked(namespace: dict, rules: dict = PARAMETER_RULES, applied: dict | None = None,
            n_train: int | None = None) -> dict:
    """The notebook's settings, picked out of `namespace` (its globals()) by `rules` and checked: the
    dict the rest of the notebook uses. Raises ParameterError naming every bad value.

    Also checked: names papermill injected (a misspelt `-p epoch 5` is refused, not ignored), names
    that differ from a parameter only in case (`lr_D = 1e-4` in a new cell), with `n_train` the
    settings that depend on the training set's size, and with `applied` (the settings the cells above
    used, when the training cell runs again) that nothing they used has changed since.
    """
    config = parameters_from(namespace, rules)
    injected = injected_parameters(namespace.get("In", [])) if applied is None else {}
    validate_parameters({**config, **injected, **misspelt_parameters(namespace, rules)}, rules)
    validate_memory(config, rules)
    if applied is not None:
        config = {**{k: v for k, v in applied.items() if k not in rules}, **config}  # what the data decided, e.g. channels
        check_setup_unchanged(applied, config)
        check_checkpoint_fits(applied, config)  # e.g. latent_dim changed: re-run from the cell that builds the models
    if n_train is not None:
        validate_against_data(config, n_train)
    return config


# Settings that fix the networks' shapes: a checkpoint made with other values cannot be loaded.
ARCHITECTURE_KEYS = ("latent_dim", "g_hidden", "d_hidden", "g_batchnorm")
DCGAN_ARCHITECTURE_KEYS = ("latent_dim", "image_size", "g_width", "d_width")


# What the networks were built with in checkpoints made before a shape became a setting.
ARCHITECTURE_BEFORE_SETTING = {"g_hidden": [256, 512, 1024], "d_hidden": [1024, 512, 256]}


def built_with(model_config: dict, key: str):
    """The value of architecture setting `key` that the networks of `model_config` (a checkpoint's
    config, or the models built in this kernel) have: widths as a list; the old fixed shapes where the
    config predates the setting."""
    value = model_config.get(key, ARCHITECTURE_BEFORE_SETTING.get(key))
    return list(value) if isinstance(value, tuple) else value


def notebook_of(config: dict) -> str:
    """Which notebook a config (a checkpoint's, or the one in this kernel) belongs to: only DCGAN.ipynb
    has the convolutional widths."""
    return "DCGAN.ipynb" if "g_width" in config else "Vanilla_GAN.ipynb"


def check_same_notebook(checkpoint_config: dict, config: dict) -> str:
    """CheckpointError when the checkpoint is the other notebook's (every setting would differ: say
    why instead); returns the notebook that made it."""
    made_by, resumed_in = notebook_of(checkpoint_config), notebook_of(config)
    if made_by != resumed_in:
        raise CheckpointError(f"this is a checkpoint of {made_by}, not of {resumed_in}: resume it with "
                              f"{made_by}, or start afresh with resume=''.")
    return made_by


def check_checkpoint_fits(checkpoint_config: dict, config: dict) -> None:
    """Raise CheckpointError listing every architecture setting where checkpoint and notebook differ,
    and the moving average of G switched on or off."""
    def wanted(k):  # lists and tuples of widths compare equal
        return list(config[k]) if isinstance(config.get(k), tuple) else config.get(k)

    made_by = check_same_notebook(checkpoint_config, config)
    keys = DCGAN_ARCHITECTURE_KEYS if made_by == "DCGAN.ipynb" else ARCHITECTURE_KEYS

    diffs = [f"{k}: checkpoint has {built_with(checkpoint_config, k)!r}, notebook has {wanted(k)!r}"
             + (" (the checkpoint predates this setting)" if k not in checkpoint_config else "")
             for k in keys if built_with(checkpoint_config, k) != wanted(k)]
    # The moving average of G may change its decay, but not go on or off: switched on, it would start
    # from weights it never averaged; switched off, it would stop while still drawing every picture.
    was, now = checkpoint_config.get("ema_decay"), config.get("ema_decay")
    if was is not None and now is not None and (was > 0) != (now > 0):
        diffs.append(f"ema_decay: checkpoint has {was!r}, notebook has {now!r} (the moving average of G is "
                     "switched on or off only in a new run; to look at G itself, draw from G, e.g. "
                     "gu.generate_images(G, 64, latent_dim))")
    if diffs:
        raise CheckpointError("the checkpoint does not fit the notebook's settings:\n  - "
                              + "\n  - ".join(diffs)
                              + "\nSet these parameters as the checkpoint has them, or start afresh with resume=''.")
