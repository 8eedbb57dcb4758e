# Two entry points, each sets up .venv on first use: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
SUPRA := $(VENV)/bin/supra

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel on disk, not a multi-GB CUDA build.
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $(STAMP)

.PHONY: setup demo test test-fast teacher mini-supra
setup: $(STAMP)

# Linearize the tiny pretrained softmax teacher, uptrain it (held-out loss of the teacher, before
# and after), then generate from the uptrained model's recurrent state.
demo: $(STAMP)
	$(SUPRA) run uptrain --config tiny/uptrain
	$(SUPRA) run generate --config tiny/generate prompt="The with statement"
	$(SUPRA) run generate --config tiny/generate prompt="Return a list of"
	@echo "uptrained checkpoint: $$(ls -d outputs/tiny_uptrain/checkpoints/step_*/model | tail -n 1)"

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

# Rebuild the committed teacher (tokenizer, pretraining, bf16 checkpoint, card.json): ~20 min.
teacher: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/python recipes/tiny_teacher.py --out supra/assets/tiny_teacher

# The small-scale SUPRA replication of docs/results/mini_supra.md (tables and plots): ~1 hour.
mini-supra: $(STAMP)
	$(VENV)/bin/pip install --quiet -e ".[bench]"
	OMP_NUM_THREADS=1 $(VENV)/bin/python recipes/mini_supra.py
