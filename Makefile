# Two entry points, each doing its own set-up on a fresh machine:
#   make run    trains with the default hyperparameters, headless, into runs/<date-time>/
#   make test   runs the test suite
#   make jupyter opens the notebook in JupyterLab
# Point GAN_DATA_DIR at a directory holding MNIST/raw/ to skip the download into data/.

VENV ?= .venv
PYTHON ?= python3
RUN_DIR ?= runs/$(shell date +%Y-%m-%d_%H-%M-%S)
PARAMS ?=

.PHONY: run test jupyter clean-venv

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $@

run: $(VENV)/.installed
	mkdir -p $(RUN_DIR)
	$(VENV)/bin/papermill Vanilla_GAN.ipynb $(RUN_DIR)/Vanilla_GAN.ipynb -k python3 --log-output \
		-p run_dir $(RUN_DIR) $(PARAMS)
	@echo "Done: results in $(RUN_DIR)/ (executed notebook: $(RUN_DIR)/Vanilla_GAN.ipynb)"

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q tests

# Jupyter itself is installed on first use only (CI and headless runs do not need it).
jupyter: $(VENV)/.installed
	$(VENV)/bin/python -c "import jupyterlab" 2>/dev/null || $(VENV)/bin/python -m pip install --quiet jupyterlab
	$(VENV)/bin/jupyter lab Vanilla_GAN.ipynb

clean-venv:
	rm -rf $(VENV)
