# Two entry points, each sets up .venv on first use: `make demo` (the main job) and `make test`.
# Setup installs the exact versions of constraints.txt (the set the suite last passed with), so a
# clone keeps passing when upstream releases; pyproject.toml keeps open ranges for users.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
SUPRA := $(VENV)/bin/supra
CONSTRAINTS := constraints.txt
# torch is chosen apart from the rest: the CPU wheel on disk, not a multi-GB CUDA build.
TORCH ?= torch==2.13.0
LATEST := .venv-latest

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip -c $(CONSTRAINTS)
	$(VENV)/bin/pip install --quiet $(TORCH) -c $(CONSTRAINTS)
	$(VENV)/bin/pip install --quiet -e ".[dev]" -c $(CONSTRAINTS)
	touch $(STAMP)

.PHONY: setup demo test test-fast test-latest lock teacher mini-supra
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

# The newest releases the ranges in pyproject.toml allow, in a fresh .venv-latest, no constraints
# (torch stays $(TORCH)): shows what an upstream release breaks before users meet it.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	echo "$(TORCH)" > $(LATEST)/torch-constraint.txt
	$(LATEST)/bin/pip install --quiet $(TORCH)
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]" -c $(LATEST)/torch-constraint.txt
	$(LATEST)/bin/pip list --format freeze 2>/dev/null | grep -iE '^(torch|torchtune|torchao|transformers|lm.eval|huggingface.hub|tokenizers|gguf|datasets|numpy)=='
	$(LATEST)/bin/python -m pytest -q

# After `make test-latest` passes: record its versions as the new constraints.
lock:
	$(LATEST)/bin/pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/' > $(CONSTRAINTS).new
	{ echo "# Versions the test suite last passed with (make test-latest, then make lock). make setup installs"; \
	  echo "# exactly these; pyproject.toml keeps open ranges for users."; cat $(CONSTRAINTS).new; } > $(CONSTRAINTS)
	rm $(CONSTRAINTS).new

# Rebuild the committed teacher (tokenizer, pretraining, bf16 checkpoint, card.json): ~20 min.
teacher: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/python recipes/tiny_teacher.py --out supra/assets/tiny_teacher

# The small-scale SUPRA replication of docs/results/mini_supra.md (tables and plots): ~1 hour.
mini-supra: $(STAMP)
	$(VENV)/bin/pip install --quiet -e ".[bench]" -c $(CONSTRAINTS)
	OMP_NUM_THREADS=1 $(VENV)/bin/python recipes/mini_supra.py
