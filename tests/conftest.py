"""Shared fixtures: where MNIST is, disposable copies of it to damage, and running the notebook.

MNIST is found through the GAN_DATA_DIR environment variable (default: data/ in the repository), a
directory holding MNIST/raw/ in torchvision's layout. Before any test runs, missing files are
downloaded there as `make run` downloads them; when that fails the whole run stops at once with the
message that says what to do (no test is quietly skipped). The shared copy is only ever read: tests
that damage files work on copies in their own tmp_path.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "Vanilla_GAN.ipynb"
# `import gan_utils` and `from gan import ...` from the repository root, and the scripts by name
# (`import sweep`), wherever pytest runs.
for path in (REPO_ROOT, REPO_ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from gan import errors, mnist_data, runs  # noqa: E402

RAW_NAMES = [spec.name for spec in mnist_data.MNIST_FILES.values()]

# Tiny settings for notebook runs: 8 steps per epoch, seconds per run on a laptop CPU.
TINY_PARAMS = dict(train_subset=512, batch_size=64, epochs=2, metrics_samples=256, eval_samples=500,
                   log_every=2, checkpoint_every=1, device="cpu", seed=0)

# Columns of metrics.csv that measure the machine (wall time, memory), not the computation: ignored
# when runs are compared (train_seconds, eval_seconds, peak_rss_mb, ...).
MACHINE_COLUMN_SUFFIXES = ("_seconds", "_mb")


def is_machine_column(name: str) -> bool:
    return name.endswith(MACHINE_COLUMN_SUFFIXES)


def data_root_from_env() -> Path:
    """GAN_DATA_DIR (default "data"), relative paths taken from the repository root like the notebook."""
    path = Path(os.environ.get(mnist_data.DATA_DIR_ENV, "data")).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def pytest_sessionstart(session):
    """Every run of the suite gets MNIST the way `make run` does, or stops in seconds saying how."""
    root = data_root_from_env()
    try:
        mnist_data.ensure_mnist(root, download=True, timeout=10)
    except errors.DataError as exc:
        pytest.exit(f"The tests need MNIST. {exc}", returncode=3)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The directory holding MNIST/raw/ (GAN_DATA_DIR, or data/; made complete at session start)."""
    return data_root_from_env()


@pytest.fixture(scope="session")
def splits(data_dir):
    """MNIST from `data_dir` ($GAN_DATA_DIR, default data/; downloaded at session start if missing)."""
    return mnist_data.load_mnist(data_dir, download=False)


@pytest.fixture(scope="session")
def classifier():
    """The committed MNIST reference classifier."""
    from gan.mnist_classifier import load_classifier
    return load_classifier()


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
            if plain and (src / name).is_file():
                shutil.copyfile(src / name, raw / name)  # copyfile: no read-only mode bits copied
            elif plain:  # a downloaded copy has only the .gz files: unpack one here
                (raw / name).write_bytes(gzip.decompress((src / (name + ".gz")).read_bytes()))
            if gz and not (src / (name + ".gz")).is_file():
                pytest.skip(f"{src / name}.gz is not in {src} (only the unpacked file); this test needs the official .gz")
            if gz:
                shutil.copyfile(src / (name + ".gz"), raw / (name + ".gz"))
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


def run_notebook(tmp_path, data_dir=None, output=None, notebook=NOTEBOOK, **params):
    """Execute Vanilla_GAN.ipynb (or another `notebook`) with papermill (tiny defaults, overridden by `params`) and return
    the executed notebook (a NotebookNode). Raises papermill.PapermillExecutionError when a cell
    fails; the executed notebook is written to `output` (default tmp_path/"executed.ipynb")."""
    import papermill

    import run_notebook

    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    full = notebook_params(tmp_path, data_dir if data_dir is not None else data_root_from_env(), **params)
    output = Path(output) if output else tmp_path / "executed.ipynb"
    saved = {k: os.environ.get(k) for k in kernel_env()}
    os.environ.update(kernel_env())  # the kernel inherits this process's environment
    try:
        return papermill.execute_notebook(str(notebook), str(output), parameters=full,
                                          kernel_name="python3", cwd=str(REPO_ROOT), progress_bar=False,
                                          iopub_timeout=run_notebook.IOPUB_TIMEOUT)  # a loaded machine is no failure
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
    """metrics.csv without the wall-time and memory columns, for exact comparison between runs."""
    return without_machine_columns(runs.read_metrics_csv(Path(run_dir) / "metrics.csv"))


def without_machine_columns(rows) -> list[dict]:
    return [{k: float(v) for k, v in row.items() if not is_machine_column(k)} for row in rows]


@dataclass
class NotebookRun:
    """One executed notebook: the notebook (also when a cell failed), its run directory, the
    papermill error (None when every cell ran) and how long it took."""

    nb: object
    run_dir: Path
    error: Exception | None
    seconds: float

    def check(self):
        """Fail the calling test with the notebook's own traceback if a cell raised."""
        if self.error is not None:
            pytest.fail(f"the notebook failed: {self.error}", pytrace=False)
        return self


def execute_cached(tmp: Path, data: Path, notebook=NOTEBOOK, **params) -> NotebookRun:
    import nbformat
    import papermill

    started = time.perf_counter()
    output = tmp / "executed.ipynb"
    try:
        nb, error = run_notebook(tmp, data, output=output, notebook=notebook, **params), None
    except papermill.PapermillExecutionError as exc:
        nb, error = nbformat.read(output, as_version=4), exc
    return NotebookRun(nb, Path(params.get("run_dir") or tmp / "run"), error, time.perf_counter() - started)


@pytest.fixture(scope="session")
def notebook_runs(tmp_path_factory):
    """Session cache of notebook runs: notebook_runs(**params) executes the notebook once per distinct
    set of parameters (tiny defaults, run_dir in a fresh temporary directory) and returns a
    NotebookRun. A failing cell does not raise here: tests that need the run call .check()."""
    cache = {}

    def get(**params):
        key = tuple(sorted(params.items()))
        if key not in cache:
            cache[key] = execute_cached(tmp_path_factory.mktemp("nbrun"), data_root_from_env(), **params)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_run(notebook_runs, data_dir) -> NotebookRun:
    """The default tiny run (2 epochs, seed 0, final evaluation on 500 samples), run once per session."""
    return notebook_runs()


def names_used_before_defined(notebook: Path) -> list[tuple[int, str, int]]:
    """(cell, name, the cell that first defines it) for each global name a code cell uses (at its top
    level or inside its functions) that only a later cell defines: the notebook would not read straight
    down, and Restart & Run All would depend on what runs when. Cells are numbered from 1."""
    import symtable

    def globals_of(source: str) -> tuple[set, set]:
        used, defined = set(), set()

        def walk(table):
            for symbol in table.get_symbols():
                name = symbol.get_name()
                if table.get_type() == "module":
                    if symbol.is_assigned() or symbol.is_imported():
                        defined.add(name)
                    if symbol.is_referenced():
                        used.add(name)
                elif symbol.is_global() and symbol.is_referenced():
                    used.add(name)
            for child in table.get_children():
                walk(child)

        walk(symtable.symtable(source, "cell", "exec"))
        return used, defined

    cells = [(number, "".join(c["source"])) for number, c in enumerate(json.loads(Path(notebook).read_text())["cells"], 1)
             if c["cell_type"] == "code"]
    first, uses = {}, []
    for number, source in cells:
        used, defined = globals_of(source)
        uses.append((number, used))
        for name in defined:
            first.setdefault(name, number)
    return sorted((number, name, first[name]) for number, used in uses for name in used if first.get(name, 0) > number)


# CIFAR-10 as folders of JPEGs (<GAN_DATA_DIR>/cifar10/{train,test}/<class>/), for DCGAN.ipynb's tests.
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cifar_root(data_dir: Path) -> Path:
    root = data_dir / "cifar10"
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        pytest.skip(f"{root}/train and /test are missing: the DCGAN tests read CIFAR-10 as folders of "
                    "images (<GAN_DATA_DIR>/cifar10/{train,test}/<class>/*.jpg, as CI has them)")
    return root


@pytest.fixture(scope="session")
def tiny_cifar(data_dir, tmp_path_factory) -> Path:
    """cifar10/train/ (256 images) and cifar10/test/ (100), from every class of the shared folder."""
    root, out = cifar_root(data_dir), tmp_path_factory.mktemp("cifar") / "cifar10"
    for split, per_class in (("train", 26), ("test", 10)):
        for name in CLASSES:
            (out / split / name).mkdir(parents=True)
            for f in sorted((root / split / name).iterdir())[:per_class]:
                shutil.copyfile(f, out / split / name / f.name)
    for f in sorted((out / "train").rglob("*.jpg"))[256:]:
        f.unlink()
    return out


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for a server a test starts)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
