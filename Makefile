# The two set-up commands of the README. Both create .venv with the pinned dependencies
# (torch_xla included) the first time, and reinstall when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: train test bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[xla,dev]'
	@touch $(STAMP)

# The main job on the embedded default (extra Hydra overrides: make train ARGS="trainer.max_steps=20").
train: $(STAMP)
	$(VENV)/bin/python train.py $(ARGS)

# The test suite. pytest's exit code 5 ("no tests collected") is not a failure of the suite.
test: $(STAMP)
	@$(VENV)/bin/python -m pytest $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

# Every benchmark (bench/), 8-15 minutes on 2 cores; rewrites BENCHMARKS.md's tables and
# benchmarks.png (extra arguments: make bench ARGS="--only eager compiled").
bench: $(STAMP)
	$(VENV)/bin/python -m bench $(ARGS)

clean-venv:
	rm -rf $(VENV)
