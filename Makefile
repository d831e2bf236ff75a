# One entry point for every task. `make help` lists them.
.PHONY: help run test test-image image fmt lint generate bench instructions perfdiff

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

run: ## Serve the quickstart manifests on 127.0.0.1:4000
	cargo run --release -p tollgate-dataplane -- --manifests examples/quickstart --listen 127.0.0.1:4000

test: ## Every check and test, with its own set-up (what CI runs)
	./scripts/test.sh

image: ## Build both container images from release binaries into dist/ (buildah, offline)
	./scripts/image.sh

test-image: ## Build the images and run them (slow: release build; not part of `make test`)
	./scripts/test-image.sh

fmt: ## Format the code
	cargo fmt --all

lint: ## Clippy, warnings as errors
	cargo clippy --workspace --all-targets -- -D warnings

generate: ## Regenerate the CRD YAML in charts/tollgate/files/crds
	cargo run -q -p tollgate-crds --bin crdgen

bench: ## Gateway vs direct vs nginx, in one run
	./bench/run.sh

instructions: ## Instructions per request under callgrind (deterministic, for small changes)
	./bench/instructions.sh

perfdiff: ## Where Tollgate's CPU per request goes beyond the bare HTTP stack, in real time (perf)
	./bench/perfdiff.sh
