# posttrain — set-up, tests, demo and benchmarks on a fresh machine.
#   make demo    creates .venv, installs everything, runs a real post-training job end to end
#   make test    creates .venv, installs everything, runs the whole suite (then the numerically sensitive
#                files again with another thread count)
# On a GPU machine: make test TORCH=torch   (takes the CUDA build of torch instead of the CPU wheel)

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0+cpu
PYTEST_ARGS ?=
BIN := $(VENV)/bin
PLUGINS := $(sort $(wildcard plugins/*/pyproject.toml))
CONTRIB := $(sort $(wildcard contrib/*/pyproject.toml))

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DS_BUILD_OPS := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install test demo bench clean list dist

$(VENV)/.installed: pyproject.toml $(PLUGINS) $(CONTRIB) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	# every later install is constrained to the torch just installed (no CUDA wheels on CPU)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[dev,deepspeed]" $(foreach p,$(PLUGINS) $(CONTRIB),-e $(dir $(p)))
	touch $@

install: $(VENV)/.installed

# Tiny-model tests run several times faster with one thread (make test TEST_THREADS=2 to change it).
TEST_THREADS ?= 1
# ... and the numerically sensitive files run a second time with another thread count, which changes the
# order of floating-point reductions: a test that holds only for one order fails here, not on the next machine.
RERUN_THREADS ?= 2
SENSITIVE := tests/test_chunked.py tests/test_diagnose_runs.py tests/test_distributed.py tests/test_loop.py \
	tests/test_ops.py tests/test_bema.py tests/test_rollout.py tests/test_episodes.py tests/test_generation_probe.py \
	tests/test_online_steps.py $(sort $(wildcard plugins/*/tests/test_*parity*.py)) \
	$(sort $(wildcard plugins/*/tests/test_*distributed*.py))

test: install
	OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/python -m pytest tests plugins contrib -q -ra --timeout 900 $(PYTEST_ARGS)
	@echo "== the numerically sensitive tests again with OMP_NUM_THREADS=$(RERUN_THREADS) (another reduction order) =="
	OMP_NUM_THREADS=$(RERUN_THREADS) $(BIN)/python -m pytest $(SENSITIVE) -q -ra --timeout 900 -p no:cacheprovider $(PYTEST_ARGS)

demo: install
	$(BIN)/python examples/demo.py --output-dir outputs/demo

bench: install
	$(BIN)/python -m bench

# Wheels of the core and of every plugin into dist/ (install with: pip install --find-links dist posttrain-grpo)
dist: install
	rm -rf dist
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist . $(foreach p,$(PLUGINS) $(CONTRIB),$(dir $(p)))
	@ls dist

list: install
	$(BIN)/posttrain list

clean:
	rm -rf $(VENV) outputs .pytest_cache dist

.PHONY: trl-compat

# TRL-compatibility suite: TRL's own trainer tests against posttrain (see tests/trl_compat/README.md)
trl-compat: install
	$(BIN)/python -m tests.trl_compat.run --target posttrain

.PHONY: test-environments

# The OpenEnv and verifiers adapters against the real libraries (tests/test_environment_adapters.py; they skip in
# `make test`, whose fresh install stays under CI's budget without the ~90 packages these two pull in).
# openenv-core is installed without its dependency on gradio (used only by its optional web UI, and it would
# downgrade pillow); its other dependencies come with verifiers and the list below.
test-environments: install
	$(BIN)/pip install -q -c $(VENV)/constraints.txt "verifiers==0.4.0" fastapi uvicorn typer pyyaml tomli tomli-w websockets fastmcp \
		httpx openai huggingface_hub requests rich pydantic
	$(BIN)/pip install -q -c $(VENV)/constraints.txt --no-deps "openenv-core==0.3.0"
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests/test_environment_adapters.py -q -ra -p no:cacheprovider
