# Flint: the two commands a newcomer needs are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
CARGO ?= cargo
JOBS ?= 2
export FLINT_CACHE ?= $(HOME)/.cache/flint

.PHONY: images build demo e2b-demo test test-unit test-kvm test-full bench fuzz crash-test fmt clippy

## images: build (or find cached) every guest image (images/<name>/image.toml); prints NAME=DIR lines
images:
	@bash images/build.sh --all

## build: release binaries (flint-vmm, flintd, flint)
build:
	$(CARGO) build -j$(JOBS) --release --workspace --bins

## demo: the main job: boot a sandbox, exec in it, snapshot, restore clones, print timings
demo: build
	@FLINT_IMAGES="$$(bash images/build.sh)" bash scripts/demo.sh

## e2b-demo: E2B's unchanged Python SDK (its quickstart) against a flintd it starts (docs/e2b.md)
e2b-demo: build
	@FLINT_IMAGES="$$(bash images/build.sh)" $(CARGO) run -q -j$(JOBS) -p flint-tests --bin flint-demo -- e2b

## test: the whole suite, every tier below in order (what .ci/run runs)
test:
	@bash scripts/test.sh all

## test-unit: tier 0: fmt, clippy, unit tests (fake launcher, fake host network), host-mode agent; needs only Rust
test-unit:
	@bash scripts/test.sh unit

## test-kvm: tier 1: the VMM on /dev/kvm (boot, devices, snapshot round trips), driven by typed launch specs
test-kvm:
	@bash scripts/test.sh kvm

## test-full: tier 2: flintd end to end (root, S3, images, networks, jail, sessions, crash harness)
test-full:
	@bash scripts/test.sh full

## bench: snapshot/restore and boot benchmarks (print figures; not tests)
bench: build
	@FLINT_IMAGES="$$(bash images/build.sh)" $(CARGO) run -q -j$(JOBS) --release -p flint-tests --bin flint-bench -- snapshot
	@FLINT_IMAGES="$$(bash images/build.sh)" $(CARGO) run -q -j$(JOBS) --release -p flint-tests --bin flint-bench -- boot
	@FLINT_IMAGES="$$(bash images/build.sh)" FLINT_S3_SERVER="$$(bash scripts/s3-server.sh)" $(CARGO) run -q -j$(JOBS) --release -p flint-tests --bin flint-bench -- store
	@FLINT_IMAGES="$$(bash images/build.sh)" FLINT_S3_SERVER="$$(bash scripts/s3-server.sh)" $(CARGO) run -q -j$(JOBS) --release -p flint-tests --bin flint-bench -- lazy --runs 3
	@FLINT_IMAGES="$$(bash images/build.sh)" FLINT_S3_SERVER="$$(bash scripts/s3-server.sh)" $(CARGO) run -q -j$(JOBS) --release -p flint-tests --bin flint-bench -- jail --runs 5
	@FLINT_IMAGES="$$(bash images/build.sh)" FLINT_S3_SERVER="$$(bash scripts/s3-server.sh)" $(CARGO) run -q -j$(JOBS) --release -p flint-tests --bin flint-bench -- sessions --runs 1
	@FLINT_IMAGES="$$(bash images/build.sh)" FLINT_S3_SERVER="$$(bash scripts/s3-server.sh)" $(CARGO) run -q -j$(JOBS) --release -p flint-tests --bin flint-bench -- clones
	@FLINT_IMAGES="$$(bash images/build.sh)" $(CARGO) run -q -j$(JOBS) --release -p flint-tests --bin flint-bench -- net --runs 5
	@FLINT_IMAGES="$$(bash images/build.sh)" FLINT_PYTHON_IMAGE="$$(bash images/build.sh python)" $(CARGO) run -q -j$(JOBS) --release -p flint-tests --bin flint-bench -- python --runs 5
	@FLINT_IMAGES="$$(bash images/build.sh)" $(CARGO) run -q -j$(JOBS) --release -p flint-tests --bin flint-bench -- restore-floor --runs 11

## fuzz: every fuzz target for FUZZ_SECONDS (default 60) each, execs/s per target (nightly + cargo-fuzz)
fuzz:
	@bash scripts/fuzz.sh

## crash-test: the kill -9 harness, CRASH_ROUNDS (default 20) kills per operation (make test runs 2, and 1 template)
CRASH_ROUNDS ?= 20
crash-test:
	@$(CARGO) build -j$(JOBS) --workspace --bins
	@FLINT_IMAGES="$$(bash images/build.sh)" FLINT_S3_SERVER="$$(bash scripts/s3-server.sh)" \
	  FLINT_CRASH_ROUNDS=$(CRASH_ROUNDS) FLINT_CRASH_TEMPLATE_ROUNDS=$(CRASH_ROUNDS) \
	  $(CARGO) test -j$(JOBS) -p flint-tests --test crash -- --nocapture --test-threads=1

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy -j$(JOBS) --workspace --all-targets -- -D warnings
