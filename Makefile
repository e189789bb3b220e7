# Chains the stages through a pipeline manifest. Each stage's target is its
# checkpoint record in $(WORK)/stages/, so make reruns a stage only when the
# manifest or a predecessor's record changed, and the binaries themselves
# skip work that is already done (they compare input fingerprints).
#
#   make demo                      # whole pipeline on the built-in demo model
#   make test                      # the test suite (what CI runs)
#   make chat                      # real model: fetch, inspect, repack, verify, chat
#   make bench                     # rh-bench on synthetic:qwen3-next-80b, 8 layers
#
# WORK must match [model] work_dir of the manifest in PIPELINE.

CARGO    ?= cargo
PIPELINE ?= pipeline.toml
WORK     ?= work
BIN      := target/release
RH        = --pipeline $(PIPELINE)
PROMPT   ?= Write a haiku about trains.
SERVE_FLAGS ?=

.PHONY: build fetch inspect repack verify chat ask serve bench bench-run test demo clean-work

build:
	$(CARGO) build --release --workspace --bins

$(WORK)/stages/fetch.json: $(PIPELINE) | build
	$(BIN)/rh-fetch $(RH) && touch $@

$(WORK)/stages/inspect.json: $(WORK)/stages/fetch.json | build
	$(BIN)/rh-inspect $(RH) && touch $@

$(WORK)/stages/repack.json: $(WORK)/stages/fetch.json | build
	$(BIN)/rh-repack $(RH) && touch $@

$(WORK)/stages/verify.json: $(WORK)/stages/repack.json | build
	$(BIN)/rh-verify $(RH) && touch $@

fetch: $(WORK)/stages/fetch.json
inspect: $(WORK)/stages/inspect.json
repack: $(WORK)/stages/repack.json
verify: $(WORK)/stages/verify.json

# Interactive chat on the verified cache.
chat: $(WORK)/stages/inspect.json $(WORK)/stages/verify.json
	$(BIN)/rh-serve $(RH)

# One-shot answer to $(PROMPT).
ask: $(WORK)/stages/inspect.json $(WORK)/stages/verify.json
	$(BIN)/rh-serve $(RH) --prompt "$(PROMPT)" $(SERVE_FLAGS)

# OpenAI-compatible HTTP API and web chat on $(LISTEN) (or `[serve] listen`).
LISTEN ?= 127.0.0.1:8080
serve: $(WORK)/stages/inspect.json $(WORK)/stages/verify.json
	$(BIN)/rh-serve $(RH) --listen $(LISTEN) $(SERVE_FLAGS)

# The speed table on the benchmark model (real shapes, 8 of 48 layers,
# generated locally), so anyone can reproduce the README's numbers.
BENCH_PIPELINE ?= pipeline.bench.toml
BENCH_WORK     ?= bench-work
bench:
	$(MAKE) bench-run PIPELINE=$(BENCH_PIPELINE) WORK=$(BENCH_WORK)

# rh-bench on whatever PIPELINE/WORK name (after inspect and repack).
bench-run: $(WORK)/stages/inspect.json $(WORK)/stages/repack.json
	$(BIN)/rh-bench $(RH)

# The built-in demo, end to end, ending with a generated reply.
demo:
	$(MAKE) ask PIPELINE=pipeline.demo.toml WORK=demo-work PROMPT="Hello! Who are you?" SERVE_FLAGS=--thinking

# The test suite. Dependencies are optimised in the test profile
# (Cargo.toml), so numeric tests run at speed in a debug build.
test:
	$(CARGO) test --workspace

clean-work:
	rm -rf $(WORK)
