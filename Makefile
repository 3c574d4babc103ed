# Two entry points: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo
# one field of the demo run's resolved config (the random-init baseline is built like the run)
RUN_CONFIG = $(BIN)/python -c "import sys, yaml; print(yaml.safe_load(open('$(DEMO_OUT)/config.yaml'))[sys.argv[1]])"

.PHONY: demo test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/stoptool pretrain --out $(DEMO_OUT)
	$(BIN)/stoptool probe $(DEMO_OUT)/latest.safetensors --out $(DEMO_OUT)/probe.json
	$(BIN)/stoptool probe --random-init --arch $$($(RUN_CONFIG) arch) --img-size $$($(RUN_CONFIG) img_size) \
		--init $$($(RUN_CONFIG) init) --out $(DEMO_OUT)/probe-random-init.json
	$(BIN)/stoptool viz similarity $(DEMO_OUT)/latest.safetensors --out $(DEMO_OUT)/figures/similarity.png
	$(BIN)/stoptool viz heatmap $(DEMO_OUT)/latest.safetensors --out $(DEMO_OUT)/figures/heatmap.png
	$(BIN)/stoptool viz masks --config $(DEMO_OUT)/config.yaml --out $(DEMO_OUT)/figures/masks.png
	$(BIN)/stoptool viz curves $(DEMO_OUT) --out $(DEMO_OUT)/figures/curves.png
	@echo
	@echo "demo outputs in $(DEMO_OUT)/:"
	@echo "  checkpoint   $(DEMO_OUT)/latest.safetensors   (stoptool info $(DEMO_OUT)/latest.safetensors)"
	@echo "  metrics      $(DEMO_OUT)/metrics.jsonl"
	@echo "  probes       $(DEMO_OUT)/probe.json  $(DEMO_OUT)/probe-random-init.json"
	@echo "  figures      $(DEMO_OUT)/figures/{similarity,heatmap,masks,curves}.png"
	@echo
	@$(BIN)/python -m stoptool.demo $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
