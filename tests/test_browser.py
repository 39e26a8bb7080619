"""Both notebooks in JupyterLab, in a real browser, as people use them.

A Jupyter server on a free localhost port (with a token) serves copies of the notebooks with tiny
settings in a cell after the parameters cell, as papermill would inject them; Playwright drives
Debian's Chromium (/usr/bin/chromium, from `apt-get install chromium chromium-driver`; no browser is
downloaded). The test does what a user does: Restart & Run All, watch training, move the latent
explorer's slider, add a cell `epochs += 1` and run the training cell again, press the stop button
during training. Every check reads the page itself: the progress bar is a rendered widget whose count
advances, one grid image is replaced epoch after epoch, the results table appears, no cell shows an
error or a stderr box, the stop leaves the save message and no traceback. Screenshots of each step
land in <run_dir>/browser/.

Without Chromium or Playwright the tests are skipped, saying why (CI installs both).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, TINY_PARAMS, free_port

CHROMIUM = Path(os.environ.get("GAN_CHROMIUM", "/usr/bin/chromium"))
# What .ci/run found when it tried to install Chromium, if it could not.
INSTALL_NOTE = os.environ.get("GAN_BROWSER_INSTALL_NOTE", "")
# What the notebook copies need beside them to import the project (gan/, gan_utils.py) and its weights.
PROJECT_FILES = ("gan", "gan_utils.py", "weights")
VIEWPORT = {"width": 1280, "height": 900}


def missing_browser() -> str | None:
    if not CHROMIUM.exists():
        return (f"no Chromium at {CHROMIUM}: install it with `apt-get install chromium chromium-driver` "
                f"(or point GAN_CHROMIUM at one){'; CI: ' + INSTALL_NOTE if INSTALL_NOTE else ''}")
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed: `pip install -r requirements.txt`"
    return None


pytestmark = pytest.mark.skipif(missing_browser() is not None, reason=str(missing_browser()))


# --------------------------------------------------------------------------------------------
# A Jupyter server on copies of the notebooks, and the browser
# --------------------------------------------------------------------------------------------


def notebook_copy(notebook: Path, out: Path, params: dict) -> None:
    """`notebook` with `params` in a cell after its parameters cell, as papermill injects them."""
    nb = json.loads(notebook.read_text())
    at = next(i for i, c in enumerate(nb["cells"]) if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "# Parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items()) + "\n"
    nb["cells"].insert(at + 1, {"cell_type": "code", "id": "injected", "execution_count": None,
                                "metadata": {"tags": ["injected-parameters"]}, "outputs": [], "source": source})
    out.write_text(json.dumps(nb, indent=1))


class LabServer:
    """`jupyter lab` serving `root`, its settings and runtime files in `home` (nothing of the user's)."""

    def __init__(self, root: Path, home: Path, data_dir: Path):
        self.root, self.port, self.token = root, free_port(), secrets.token_hex(16)
        settings = home / "lab-settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True)
        # No "Would you like to get notified about official Jupyter news?" toast over the notebook.
        (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                               "checkForUpdates": False}))
        env = {**os.environ, "GAN_DATA_DIR": str(data_dir), "JUPYTER_CONFIG_DIR": str(home / "config"),
               "JUPYTERLAB_SETTINGS_DIR": str(home / "lab-settings"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
               "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "IPYTHONDIR": str(home / "ipython")}
        self.log = home / "server.log"
        # expose_app_in_browser: the test finds cells by their source through JupyterLab's own model
        # (the editors draw only the lines on screen); it changes nothing the user sees.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.port={self.port}",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}",
             "--ServerApp.allow_root=True", "--LabApp.expose_app_in_browser=True"],
            env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_until_up()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def wait_until_up(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.url("api/status"), timeout=2)
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"jupyter lab did not answer in {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)  # the server and the kernels it started
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, data_dir):
    home = tmp_path_factory.mktemp("lab")
    root = home / "work"
    root.mkdir()
    for name in PROJECT_FILES:
        (root / name).symlink_to(REPO_ROOT / name)
    server = LabServer(root, home, data_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox needs user namespaces, which containers (and root) lack.
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


# --------------------------------------------------------------------------------------------
# What a user sees: the page, read through its DOM
# --------------------------------------------------------------------------------------------

# The state of one cell's outputs, read from the page: its prompt, the text, the images (a hash of
# each src), the progress bar widgets and their labels, error and stderr boxes, tables, sliders.
CELL_STATE = """(cell) => {
  const hash = (s) => { let h = 0; for (let k = 0; k < s.length; k += 7) h = (h * 31 + s.charCodeAt(k)) >>> 0; return h + ':' + s.length; };
  const area = cell.querySelector('.jp-OutputArea');
  return {
    prompt: cell.querySelector('.jp-InputPrompt')?.textContent.trim() || '',
    text: area ? area.textContent : '',
    images: [...cell.querySelectorAll('.jp-OutputArea img')].map(img => hash(img.src)),
    bars: cell.querySelectorAll('.jp-OutputArea .widget-hprogress, .jp-OutputArea .jupyter-widget-hprogress').length,
    labels: [...cell.querySelectorAll('.jp-OutputArea .widget-html-content')].map(e => e.textContent),
    stderr: [...cell.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')].map(e => e.textContent),
    tables: cell.querySelectorAll('.jp-OutputArea table').length,
    sliders: cell.querySelectorAll('.jp-OutputArea .widget-slider, .jp-OutputArea .jupyter-widget-slider').length,
  };
}"""
CELLS = "[...document.querySelectorAll('.jp-Notebook .jp-Cell')]"
CELL_STATE_JS = f"(i) => ({CELL_STATE})({CELLS}[i])"
ALL_STATES_JS = f"() => {CELLS}.map({CELL_STATE})"

# Pixels of the last image in cell `i`, hashed (drawn on a canvas: the image as the browser shows it).
PIXELS_JS = """(i) => {
  const imgs = document.querySelectorAll('.jp-Notebook .jp-Cell')[i].querySelectorAll('.jp-OutputArea img');
  const img = imgs[imgs.length - 1];
  if (!img || !img.complete || img.naturalWidth === 0) return null;  // replaced, not yet decoded
  const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data; let h = 0;
  for (let k = 0; k < d.length; k += 4) h = (h * 31 + d[k] + 7 * d[k + 1] + 13 * d[k + 2]) >>> 0;
  return [c.width, c.height, h];
}"""

IMAGE_DRAWN_JS = """(i) => {
  const imgs = document.querySelectorAll('.jp-Notebook .jp-Cell')[i].querySelectorAll('.jp-OutputArea img');
  return imgs.length > 0 && imgs[imgs.length - 1].complete && imgs[imgs.length - 1].naturalWidth > 0;
}"""

# The index of the one cell whose source holds `snippet`, from JupyterLab's model of the notebook.
CELL_INDEX_JS = """(snippet) => {
  const cells = window.jupyterapp.shell.currentWidget.content.widgets;
  const hits = cells.map((c, i) => [i, c.model.sharedModel.getSource()]).filter(([i, s]) => s.includes(snippet));
  return hits.length === 1 ? hits[0][0] : -hits.length;
}"""

BUSY_PROMPT = "[*]:"
UNRENDERED = ("Loading widget...", "Error displaying widget", "HBox(children", "VBox(children", "FloatProgress(")
TRACEBACK_MARKS = ("Traceback", 'File "', "site-packages")


class Notebook:
    """One notebook open in JupyterLab, driven as a user drives it."""

    def __init__(self, page, lab: LabServer, name: str, shots: Path):
        self.page, self.shots, self.shot_count = page, shots, 0
        page.goto(lab.url(f"lab/tree/{name}") + "&reset")  # reset: only this notebook, not the last page's tabs
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        # Every cell of the file loaded and drawn (JupyterLab attaches them in turn), so that a cell's
        # index in the model is its index on the page.
        n = len(json.loads((lab.root / name).read_text())["cells"])
        page.wait_for_function(f"() => window.jupyterapp?.shell.currentWidget?.content.widgets.length === {n}"
                               f" && {CELLS}.length === {n}", timeout=60_000)
        self.wait_for_kernel_idle()

    def wait_for_kernel_idle(self, timeout: float = 90) -> None:
        self.page.wait_for_function(
            "() => /\\| Idle/.test(document.querySelector('#jp-main-statusbar')?.innerText || '')",
            timeout=timeout * 1000)

    def button(self, command: str):
        return self.page.locator(f"jp-button[data-command='{command}'], button[data-command='{command}']").first

    def restart_and_run_all(self) -> None:
        self.button("notebook:restart-run-all").click()
        self.page.locator(".jp-Dialog .jp-mod-accept").click()  # "Restart Kernel?" -> Restart

    def cell_index(self, snippet: str) -> int:
        index = self.page.evaluate(CELL_INDEX_JS, snippet)
        assert index >= 0, f"{-index} cells hold {snippet!r}"
        return index

    def state(self, i: int) -> dict:
        return self.page.evaluate(CELL_STATE_JS, i)

    def all_states(self) -> list[dict]:
        return self.page.evaluate(ALL_STATES_JS)

    def running(self) -> bool:
        return any(s["prompt"] == BUSY_PROMPT for s in self.all_states())

    def wait_until_done(self, timeout: float, watch: int | None = None, every: float = 0.2) -> list[dict]:
        """Wait until no cell runs (the kernel idle and no [*] prompt, twice in a row); returns the
        states of cell `watch` seen on the way."""
        seen, quiet, deadline = [], 0, time.monotonic() + timeout
        time.sleep(0.5)  # the run has started
        while time.monotonic() < deadline:
            if watch is not None:
                seen.append(self.state(watch))
            idle = "| Idle" in (self.page.locator("#jp-main-statusbar").inner_text() or "")
            quiet = quiet + 1 if idle and not self.running() else 0
            if quiet >= 2:
                return seen
            time.sleep(every)
        raise TimeoutError(f"cells still running after {timeout} s")

    def select(self, i: int) -> None:
        """Click cell i's prompt, as a user selects a cell (command mode)."""
        cell = self.page.locator(".jp-Notebook .jp-Cell").nth(i)
        cell.scroll_into_view_if_needed()
        cell.locator(".jp-InputPrompt").click()

    def add_cell_below(self, i: int, code: str) -> int:
        """Select cell i, insert a code cell below it (B), type `code`, run it (Shift+Enter)."""
        self.select(i)
        self.page.keyboard.press("Escape")
        self.page.keyboard.press("b")
        self.page.keyboard.press("Enter")  # edit the new cell
        self.page.keyboard.type(code)
        self.page.keyboard.press("Shift+Enter")
        return i + 1

    def run_cell(self, i: int) -> None:
        self.select(i)
        self.page.keyboard.press("Shift+Enter")

    def screenshot(self, i: int, name: str) -> Path:
        """A screenshot with cell i's outputs at the top of the view, as <shots>/NN_name.png."""
        for _ in range(2):  # again once the cells on the way are drawn: their heights were estimates
            self.page.evaluate("(i) => { const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[i];"
                               " (cell.querySelector('.jp-OutputArea-child') || cell).scrollIntoView({block: 'start'}); }", i)
            time.sleep(0.4)
        self.shot_count += 1
        path = self.shots / f"{self.shot_count:02d}_{name}.png"
        self.page.screenshot(path=str(path))
        return path


def counts(label_texts: list[str]) -> list[tuple[int, int]]:
    """(n, total) of tqdm's "n/total [...]" labels."""
    found = [re.search(r"(\d+)/(\d+)", t) for t in label_texts]
    return [(int(m.group(1)), int(m.group(2))) for m in found if m]


def problems_on_page(states: list[dict], allowed_error_cell: int | None = None) -> list[str]:
    """Error and stderr boxes, and widgets shown as text, in any cell (but `allowed_error_cell`)."""
    found = []
    for i, s in enumerate(states):
        if s["stderr"] and i != allowed_error_cell:
            found.append(f"cell {i}: stderr or error box: {' | '.join(t[:300] for t in s['stderr'])}")
        for mark in UNRENDERED:
            if mark in s["text"]:
                found.append(f"cell {i}: a widget not rendered ({mark!r})")
    return found


def checkpoint_epoch(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["epoch"]


def watch_training(seen: list[dict]) -> tuple[list[tuple[int, int]], list[str], int]:
    """From the training cell's states over a run: the bar's (n, total) counts in order, the distinct
    grid images in order, and the most images it ever showed at once."""
    bar_counts, grids = [], []
    for s in seen:
        for c in counts(s["labels"])[-1:]:
            if not bar_counts or bar_counts[-1] != c:
                bar_counts.append(c)
        for h in s["images"][-1:]:
            if not grids or grids[-1] != h:
                grids.append(h)
    return bar_counts, grids, max((len(s["images"]) for s in seen), default=0)


def assert_trained_in_place(seen: list[dict], epochs: int) -> None:
    bar_counts, grids, most_images = watch_training(seen)
    assert all(s["bars"] <= 1 for s in seen) and any(s["bars"] == 1 for s in seen), \
        "the training cell shows no progress-bar widget (tqdm.auto fell back to text?)"
    assert len(bar_counts) >= 3 and all(a[0] < b[0] for a, b in zip(bar_counts, bar_counts[1:])), \
        f"the bar's count did not advance step by step: {bar_counts}"
    assert bar_counts[-1][0] == bar_counts[-1][1], f"the bar did not reach its total: {bar_counts[-1]}"
    assert most_images == 1, f"the grid is not one picture updated in place: {most_images} images at once"
    assert len(grids) >= min(2, epochs), f"the grid was not replaced epoch after epoch ({len(grids)} pictures seen)"


def assert_ran_all_cleanly(nb: Notebook, seen: list[dict], run_dir: Path, epochs: int, evaluation_code: str,
                           row: str) -> int:
    """After Restart & Run All: trained in place (the bar, one grid), no error or stderr box anywhere,
    the results table in the evaluation cell, every epoch saved. Returns the evaluation cell's index."""
    assert_trained_in_place(seen, epochs)
    states = nb.all_states()
    assert problems_on_page(states) == []
    evaluation = nb.cell_index(evaluation_code)
    assert states[evaluation]["tables"] == 1 and row in states[evaluation]["text"]
    assert checkpoint_epoch(run_dir) == epochs
    return evaluation


def assert_explorer_responds(notebook: Notebook, name: str) -> None:
    """Click the first slider's track near its right end: the explorer's picture changes."""
    i = notebook.cell_index("explorer.explore(")
    state = notebook.state(i)
    assert state["sliders"] >= 1 and state["images"], f"no latent explorer (sliders and a picture) in cell {i}: {state}"
    track = notebook.page.locator(".jp-Notebook .jp-Cell").nth(i).locator(".noUi-target").first
    track.scroll_into_view_if_needed()  # the browser draws an image once it is near the view
    notebook.page.wait_for_function(IMAGE_DRAWN_JS, arg=i, timeout=20_000)
    before = notebook.page.evaluate(PIXELS_JS, i)
    box = track.bounding_box()
    track.click(position={"x": box["width"] * 0.9, "y": box["height"] / 2})
    deadline = time.monotonic() + 20
    after = before
    while after in (before, None) and time.monotonic() < deadline:  # None: the new picture is still decoding
        time.sleep(0.2)
        after = notebook.page.evaluate(PIXELS_JS, i)
    notebook.screenshot(i, name)
    assert after is not None and after[:2] == before[:2] and after != before, \
        f"the explorer's picture did not change: {before} -> {after}"


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------

# 8 steps an epoch on 512 images: seconds in all, long enough to see the bar move and the grid replaced
# (not to see digits form: the README's pictures of digits come from default runs).
VANILLA_PARAMS = {**TINY_PARAMS, "epochs": 3}
TRAINING_CELL = "with runs.rolled_back_when_stopped("


def open_copy(lab: LabServer, browser, name: str, params: dict, run_dir: Path):
    """A copy of the repository's notebook `name` with `params`, writing into `run_dir` (screenshots in
    its browser/), open in a new page: (the page, the Notebook, the training cell's index)."""
    notebook_copy(REPO_ROOT / name, lab.root / name, {**params, "run_dir": str(run_dir)})
    (run_dir / "browser").mkdir(parents=True)
    page = browser.new_page(viewport=VIEWPORT)
    nb = Notebook(page, lab, name, run_dir / "browser")
    return page, nb, nb.cell_index(TRAINING_CELL)


def test_vanilla_gan_in_jupyterlab_runs_continues_and_stops_as_a_user_expects(lab, browser):
    run_dir = lab.root / "run_vanilla"
    page, nb, training = open_copy(lab, browser, "Vanilla_GAN.ipynb", VANILLA_PARAMS, run_dir)

    # Restart & Run All: the bar moves, one grid is replaced epoch after epoch, the table appears.
    nb.restart_and_run_all()
    seen, shot = [], None
    deadline = time.monotonic() + 300
    while shot is None and time.monotonic() < deadline:  # a screenshot while it trains, at its second grid
        s = nb.state(training)
        seen.append(s)
        if s["bars"] and s["prompt"] == BUSY_PROMPT and len(watch_training(seen)[1]) >= 2:
            shot = nb.screenshot(training, "training")
        time.sleep(0.2)
    seen += nb.wait_until_done(300, watch=training)
    evaluation = assert_ran_all_cleanly(nb, seen, run_dir, VANILLA_PARAMS["epochs"], "metrics.full_evaluation(",
                                        "GAN (this run)")
    nb.screenshot(evaluation, "results_table")

    assert_explorer_responds(nb, "latent_explorer")

    # A new cell `epochs += 1`, then the training cell again: training continues for one epoch.
    added = nb.add_cell_below(training, "epochs += 1")
    nb.wait_until_done(60)
    nb.run_cell(training)
    seen = nb.wait_until_done(120, watch=training)
    after = nb.state(training)
    assert f"{VANILLA_PARAMS['epochs'] + 1} epochs," in after["text"], after["text"][-500:]
    bar_counts, _, _ = watch_training(seen)
    steps = VANILLA_PARAMS["train_subset"] // VANILLA_PARAMS["batch_size"]
    assert bar_counts[-1] == (steps, steps), f"continuing should train one epoch of {steps} steps: {bar_counts}"
    assert checkpoint_epoch(run_dir) == VANILLA_PARAMS["epochs"] + 1
    assert problems_on_page(nb.all_states()) == []
    nb.screenshot(training, "continued")

    # The stop button during training: the last completed epoch is saved, with a message, no traceback.
    nb.add_cell_below(added, "epochs += 100")
    nb.wait_until_done(60)
    nb.run_cell(training)
    started = VANILLA_PARAMS["epochs"] + 1
    deadline = time.monotonic() + 120
    while checkpoint_epoch(run_dir) < started + 1 and time.monotonic() < deadline:  # one more epoch saved
        time.sleep(0.2)
    nb.button("notebook:interrupt-kernel").click()
    nb.wait_until_done(120)
    stopped = nb.state(training)
    nb.screenshot(training, "interrupted")
    saved = re.search(r"Saved (\S+) after epoch (\d+)\.", stopped["text"])
    assert "Interrupted: the unfinished epoch was rolled back." in stopped["text"] and saved, stopped["text"][-800:]
    assert "KeyboardInterrupt: training stopped" in stopped["text"]
    for mark in TRACEBACK_MARKS:
        assert mark not in stopped["text"], f"a traceback after the save message ({mark!r}): {stopped['text'][-1500:]}"
    assert checkpoint_epoch(run_dir) == int(saved.group(2)) > started
    assert problems_on_page(nb.all_states(), allowed_error_cell=training) == []
    page.close()


DCGAN_PARAMS = {"batch_size": 32, "epochs": 3, "metrics_samples": 128, "eval_samples": 200, "log_every": 2,
                "device": "cpu", "seed": 0}


def test_dcgan_in_jupyterlab_runs_top_to_bottom_with_a_live_bar_one_grid_and_the_explorer(lab, browser, tiny_cifar):
    run_dir = lab.root / "run_dcgan"
    page, nb, training = open_copy(lab, browser, "DCGAN.ipynb", {**DCGAN_PARAMS, "dataset": str(tiny_cifar)}, run_dir)
    nb.restart_and_run_all()
    seen = nb.wait_until_done(400, watch=training)
    assert_ran_all_cleanly(nb, seen, run_dir, DCGAN_PARAMS["epochs"], "metrics.image_evaluation(", "DCGAN (this run)")
    nb.screenshot(training, "trained")
    assert_explorer_responds(nb, "latent_explorer")
    page.close()
