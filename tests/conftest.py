"""Shared fixtures: where MNIST is, disposable copies of it to damage, and running the notebook.

MNIST is found through the GAN_DATA_DIR environment variable (default: data/ in the repository), a
directory holding MNIST/raw/ in torchvision's layout. Tests that need it are skipped with a clear
message when it is not there. The shared copy is only ever read: tests that damage files work on
copies in their own tmp_path.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "Vanilla_GAN.ipynb"
if str(REPO_ROOT) not in sys.path:  # `import gan_utils` from the repository root, wherever pytest runs
    sys.path.insert(0, str(REPO_ROOT))

import gan_utils  # noqa: E402

RAW_NAMES = [spec.name for spec in gan_utils.MNIST_FILES.values()]

# Tiny settings for notebook runs: 8 steps per epoch, seconds per run on a laptop CPU.
TINY_PARAMS = dict(train_subset=512, batch_size=64, epochs=2, metrics_samples=256, eval_samples=500,
                   log_every=2, device="cpu", seed=0)

# Columns of metrics.csv that depend on the clock, not on the computation.
TIME_COLUMNS = {"train_seconds", "eval_seconds"}


def data_root_from_env() -> Path:
    """GAN_DATA_DIR (default "data"), relative paths taken from the repository root like the notebook."""
    path = Path(os.environ.get(gan_utils.DATA_DIR_ENV, "data")).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def mnist_present(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return all((raw / n).is_file() or (raw / (n + ".gz")).is_file() for n in RAW_NAMES)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The directory holding MNIST/raw/ (GAN_DATA_DIR); the test is skipped when MNIST isn't there."""
    root = data_root_from_env()
    if not mnist_present(root):
        pytest.skip(f"MNIST not found in {root / 'MNIST' / 'raw'} (need the four files "
                    f"{', '.join(RAW_NAMES)}, plain or .gz): set GAN_DATA_DIR to a directory holding "
                    "MNIST/raw/ in torchvision's layout")
    return root


@pytest.fixture
def make_mnist_copy(data_dir, tmp_path):
    """Factory: a private copy of MNIST/raw under tmp_path that a test may truncate or corrupt.

    make_mnist_copy(plain=True, gz=False, names=None) copies the unpacked files and/or the .gz files
    (those that exist in the shared copy) of `names` (default: all four) and returns the data root,
    i.e. the directory that holds MNIST/raw/. Files are copied, never linked, so damaging a copy can
    never reach the shared data.
    """
    counter = iter(range(1000))

    def make(plain: bool = True, gz: bool = False, names=None) -> Path:
        root = tmp_path / f"data{next(counter)}"
        raw = root / "MNIST" / "raw"
        raw.mkdir(parents=True)
        src = data_dir / "MNIST" / "raw"
        for name in names if names is not None else RAW_NAMES:
            wanted = ([name] if plain else []) + ([name + ".gz"] if gz else [])
            for fname in wanted:
                if not (src / fname).is_file():
                    pytest.skip(f"{src / fname} is not in the shared MNIST copy; this test needs it")
                shutil.copyfile(src / fname, raw / fname)  # copyfile: no read-only mode bits copied
        return root

    return make


def listing(directory: Path) -> dict:
    """{relative path: size} of every file below `directory`: compare before and after a failure."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# Running the notebook
# --------------------------------------------------------------------------------------------

def kernel_env() -> dict:
    """Environment for notebook kernels: one OpenMP thread (the fastest for tiny runs on 2 cores,
    and it keeps concurrent trainings on the machine from fighting over cores)."""
    return {"OMP_NUM_THREADS": os.environ.get("GAN_TEST_THREADS", "1"), "PYTHONHASHSEED": "0"}


def notebook_params(tmp_path: Path, data_dir: Path, **params) -> dict:
    full = dict(TINY_PARAMS, data_dir=str(data_dir), run_dir=str(Path(tmp_path) / "run"))
    full.update(params)
    return full


def run_notebook(tmp_path, data_dir=None, output=None, **params):
    """Execute Vanilla_GAN.ipynb with papermill (tiny defaults, overridden by `params`) and return
    the executed notebook (a NotebookNode). Raises papermill.PapermillExecutionError when a cell
    fails; the executed notebook is written to `output` (default tmp_path/"executed.ipynb")."""
    import papermill

    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    full = notebook_params(tmp_path, data_dir if data_dir is not None else data_root_from_env(), **params)
    output = Path(output) if output else tmp_path / "executed.ipynb"
    saved = {k: os.environ.get(k) for k in kernel_env()}
    os.environ.update(kernel_env())  # the kernel inherits this process's environment
    try:
        return papermill.execute_notebook(str(NOTEBOOK), str(output), parameters=full,
                                          kernel_name="python3", cwd=str(REPO_ROOT), progress_bar=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cell_text(cell) -> str:
    """Everything a code cell printed (streams, results, errors), as one string."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif out.get("output_type") == "error":
            parts.append(out.get("ename", "") + ": " + out.get("evalue", "") + "\n" + "\n".join(out.get("traceback", [])))
        elif "data" in out and "text/plain" in out["data"]:
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


def notebook_text(nb) -> str:
    return "\n".join(cell_text(c) for c in nb.cells if c.cell_type == "code")


def metrics_rows(run_dir: Path) -> list[dict]:
    """metrics.csv without the clock columns, for exact comparison between runs."""
    rows = gan_utils.read_metrics_csv(Path(run_dir) / "metrics.csv")
    return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in rows]


@pytest.fixture(scope="session")
def notebook_runs(tmp_path_factory):
    """Session cache of notebook runs: notebook_runs(**params) runs the notebook once per distinct
    set of parameters (tiny defaults) and returns (executed notebook, run directory)."""
    cache = {}

    def get(**params):
        key = tuple(sorted(params.items()))
        if key not in cache:
            data = data_root_from_env()
            if not mnist_present(data):
                pytest.skip(f"MNIST not found under {data}; set GAN_DATA_DIR")
            tmp = tmp_path_factory.mktemp("nbrun")
            nb = run_notebook(tmp, data, **params)
            cache[key] = (nb, tmp / "run")
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_run(notebook_runs, data_dir):
    """The default tiny run (2 epochs, seed 0, final evaluation on 500 samples), run once per session."""
    return notebook_runs()
