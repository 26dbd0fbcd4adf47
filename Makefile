# Two commands for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LT := $(VENV)/bin/loratool
FIX := fixtures/build
STAMP := $(VENV)/.installed

.PHONY: install fixtures demo test fuzz schemas clean

install: $(STAMP)

# torch==2.13.0 first: on these machines pip finds the CPU build on disk; a bare `torch`
# requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml kernels/cpu.c kernels/cpu_body.h
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

fixtures: $(FIX)/.done

$(FIX)/.done: $(STAMP) $(wildcard fixtures/*.py)
	$(PY) fixtures/generate.py --out $(FIX)
	touch $@

demo: fixtures
	@echo "== inspect =="
	$(LT) inspect $(FIX)/llama_r8
	@echo "== inspect --spectrum --modules (first rows) =="
	$(LT) inspect --spectrum --modules $(FIX)/llama_r8 | head -20
	@echo "== validate against its base =="
	$(LT) validate $(FIX)/llama_r8 --base $(FIX)/base_llama
	@echo "== validate a broken adapter (expected to fail with one line) =="
	-$(LT) validate $(FIX)/broken/nan_values
	rm -rf $(FIX)/demo_out && mkdir -p $(FIX)/demo_out
	@echo "== resize: keep 90% of each module's energy (ranks differ per module) =="
	$(LT) resize $(FIX)/llama_r8 --energy 0.9 -o $(FIX)/demo_out/llama_e90 | tail -5
	$(LT) inspect $(FIX)/demo_out/llama_e90 | grep -E "^(rank|alpha)"
	@echo "== compose 0.7/0.3, optimally truncated to rank 8 =="
	$(LT) compose --adapters $(FIX)/llama_r8:0.7,$(FIX)/llama_rslora_patterns:0.3 --rank 8 -o $(FIX)/demo_out/composed | tail -5
	$(LT) validate $(FIX)/demo_out/composed --base $(FIX)/base_llama
	@echo "== manifest: pin the adapter to its base by content =="
	cp -r $(FIX)/llama_r8 $(FIX)/demo_out/pinned
	$(LT) manifest $(FIX)/demo_out/pinned --base $(FIX)/base_llama
	@echo "== merge 0.7/0.3 into the sharded bf16 base, then check parity =="
	$(LT) merge --base $(FIX)/base_llama --adapters $(FIX)/demo_out/pinned:0.7,$(FIX)/llama_rslora_patterns:0.3 -o $(FIX)/demo_out/merged --quiet
	$(LT) parity --base $(FIX)/base_llama --merged $(FIX)/demo_out/merged --adapters $(FIX)/demo_out/pinned:0.7,$(FIX)/llama_rslora_patterns:0.3 --forward | tail -4
	@echo "== QLoRA-aware merge: onto dequant(quant(W)), the 4-bit base the adapter was trained on =="
	$(LT) merge --base $(FIX)/base_llama --adapters $(FIX)/demo_out/pinned -o $(FIX)/demo_out/merged_nf4 --base-precision nf4,double-quant --quiet | tail -6
	$(LT) parity --base $(FIX)/base_llama --merged $(FIX)/demo_out/merged_nf4 --adapters $(FIX)/demo_out/pinned | tail -2
	@echo "== a base with the right shapes but other weights is refused (exit 3) =="
	-$(LT) merge --base $(FIX)/base_llama_other --adapters $(FIX)/demo_out/pinned -o $(FIX)/demo_out/refused --quiet
	@echo "== an output over its own input is refused, even with --overwrite (exit 2) =="
	-$(LT) resize $(FIX)/demo_out/llama_e90 --rank 2 -o $(FIX)/demo_out/llama_e90 --overwrite
	@echo "== convert kohya -> peft -> kohya =="
	$(LT) convert $(FIX)/kohya_sd.safetensors --to peft -o $(FIX)/demo_out/kohya_as_peft
	$(LT) convert $(FIX)/demo_out/kohya_as_peft --to kohya -o $(FIX)/demo_out/roundtrip.safetensors
	$(LT) inspect $(FIX)/demo_out/roundtrip.safetensors

test: fixtures
	$(PY) -m pytest -q

# A long seeded fuzz run through every reading command (tests/fuzz); prints counts per class and
# the distinct failure causes with reproducers. `make test` runs a few hundred cases of it.
FUZZ_RUNS ?= 2000
FUZZ_SEED ?= 1
fuzz: fixtures
	$(PY) -m tests.fuzz --runs $(FUZZ_RUNS) --seed $(FUZZ_SEED)

# Regenerate the JSON Schema files in schemas/ from the pydantic models (a test checks them).
schemas: $(STAMP)
	$(PY) -m loratool.schemas.export

clean:
	rm -rf $(VENV) $(FIX)
