# The two commands a newcomer needs: `make demo` and `make test`. Both install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo demo-sft demo-continue test kenlm test-corpora slurm-local gpu-check gpu-wheels

install:
	bash scripts/setup_env.sh $(VENV)

# Pretraining (steps 1-6), then instruction tuning, one chat exchange and a q8_0 GGUF run in llama.cpp (7-9).
demo: install kenlm
	$(PY) demo/run_demo.py

# Steps 7-9 alone, from runs/demo (running steps 1-6 first if they are missing).
demo-sft: install kenlm
	$(PY) demo/run_demo_sft.py

# The Chinese-LLaMA recipe on the demo's model, offline on CPU in ~3 minutes (reuses runs/demo, running the demo
# first if it is missing): the tokenizer extended with fortunes-zh's pieces, LoRA continued pretraining with the
# embedding and head trained, perplexity of both languages before/after, exports loaded by transformers + peft.
demo-continue: install kenlm test-corpora
	$(PY) demo/run_demo_continue.py

test: install kenlm test-corpora slurm-local
	$(PY) -m pytest tests

# KenLM's lmplz/build_binary (perplexity models), built once into third_party/build/kenlm/bin.
kenlm: install
	bash scripts/build_kenlm.sh $(PY)

# Debian packages of real multilingual text read by the data-pipeline tests (apt-get when missing).
test-corpora:
	bash scripts/install_test_corpora.sh

# A one-node SLURM cluster on this machine (slurm-wlm + munge via apt-get when missing) for tests/launch.
slurm-local:
	bash launch/slurm_local/setup.sh >/dev/null

# On a machine with one NVIDIA GPU and its own CUDA torch (no .venv, no network needed): installs what the
# CUDA tests lack from .whl/ (else PyPI), runs tests/cuda and the GPU benchmarks in under 8 minutes, and
# writes runs/gpu_check/gpu_check.json and the "GPU check" section of benchmarks/RESULTS.md (docs/gpu_check.md).
# Flags through GPU_CHECK_ARGS. A smoke run of the script on CPU (the CUDA tests skip):
#   make gpu-check GPU_PY=.venv/bin/python GPU_CHECK_ARGS="--device cpu --quick"
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) scripts/gpu_check run $(GPU_CHECK_ARGS)

# On a networked machine: the wheels gpu-check installs (pure Python, for the GPU machines' Python 3.12),
# into .whl/, which is git-ignored: copy it to the GPU machine with the working tree.
gpu-wheels:
	$(GPU_PY) scripts/gpu_check wheels
