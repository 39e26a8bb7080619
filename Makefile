# Two entry points, each doing its own set-up on a fresh machine:
#   make run    trains with the default hyperparameters, headless, into runs/<date-time>/
#   make run-dcgan  the same for DCGAN.ipynb (colour images; CIFAR-10 by default)
#   make runs   runs a set of runs (SEEDS=5, GRID="lr_g=4e-4,8e-4", OUT=runs/<name>) through Dask
#   make test   runs the test suite
#   make export  writes the notebooks' marked cells to gan/vanilla_gan.py and gan/dcgan.py
#   make jupyter opens the notebook in JupyterLab
# Point GAN_DATA_DIR at a directory holding MNIST/raw/ to skip the download into data/.

VENV ?= .venv
PYTHON ?= python3
# Which notebook `make run` runs: the MNIST MLP GAN, or DCGAN.ipynb (colour images; `make run-dcgan`).
NOTEBOOK ?= Vanilla_GAN.ipynb
# Where the run writes. Unset, scripts/run_notebook.py picks it as the notebook does: a resumed checkpoint's
# own directory, else runs/<date-time>/. Exported, so the recipe reads it as "$$RUN_DIR": the shell
# then takes the value as one word, whatever it holds (spaces, quotes, $).
export RUN_DIR
# Passed to the shell as written, so a value with spaces carries its own quotes: PARAMS="-p resume 'runs/my run/checkpoint.pt'"
PARAMS ?=

.PHONY: run run-dcgan runs test export jupyter clean-venv

$(VENV)/.installed: requirements.txt
	@echo "Installing requirements.txt into $(VENV)/ (PyTorch, JupyterLab, papermill, pytest; about 3 minutes, once)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $@

# scripts/run_notebook.py is papermill (same notebook, output, kernel, logged output, -p parameters) plus a
# safe stop: Ctrl-C or SIGTERM interrupts the kernel, which saves a checkpoint, and the command to
# resume is printed here. exec: make's SIGTERM then reaches the runner itself, not a shell around it.
run: $(VENV)/.installed
	exec $(VENV)/bin/python scripts/run_notebook.py $(NOTEBOOK) $${RUN_DIR:+-p run_dir "$$RUN_DIR"} $(PARAMS)

# Many runs of $(NOTEBOOK): SEEDS seeds (a count, a list 0,3,7 or a range 10-14) of each GRID setting
# (NAME=V1,V2; several separated by spaces), PARAMS for all, into OUT; SCHEDULER=tcp://host:8786 sends
# them to a Dask cluster instead of this machine. The same command again skips finished runs and resumes stopped ones.
SEEDS ?= 5
GRID ?=
OUT ?=
SCHEDULER ?=
runs: $(VENV)/.installed
	exec $(VENV)/bin/python scripts/run_many.py $(NOTEBOOK) --seeds $(SEEDS) $(foreach g,$(GRID),--grid $(g)) \
		$(if $(OUT),--out "$(OUT)") $(if $(SCHEDULER),--scheduler $(SCHEDULER)) $(PARAMS)

# DCGAN.ipynb with its defaults on CIFAR-10 (from GAN_DATA_DIR, else downloaded into data/); point it
# at a folder of images with PARAMS="-p dataset /path/to/folder".
run-dcgan:
	$(MAKE) run NOTEBOOK=DCGAN.ipynb

# -n auto: one pytest worker per core (at most 4), each test file on one worker (its module fixtures built
# once); most tests wait on a 1-thread notebook kernel, so two workers on 2 cores took 647 s against 870 s.
# -rs: any skipped test listed with its reason; the 15 slowest.
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -rs --durations=15 -n auto --maxprocesses 4 --dist loadfile tests

# After editing a cell marked `# exported to gan/...`: the scripts and DCGAN.ipynb import the module.
export: $(VENV)/.installed
	$(VENV)/bin/python scripts/export_notebooks.py

# Jupyter refuses to start as root unless told: in a container, root is the only user there is.
JUPYTER_ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

jupyter: $(VENV)/.installed
	$(VENV)/bin/jupyter lab Vanilla_GAN.ipynb $(JUPYTER_ROOT_FLAG)

clean-venv:
	rm -rf $(VENV)
