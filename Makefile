# The two commands: `make run` (local stack + service on :3001) and `make test`.
.PHONY: run test stack-up stack-down stack-status lint bench bench-indexer bench-costs bench-instructions load load-accepts-first

run: stack-up
	cargo build --release --bin comm-aggregator --bin provider-sandbox
	@echo "service on http://127.0.0.1:$${PORT:-3001} (providers: the local stand-in unless real credentials are set)"
	@if [ -z "$${API_KEYS:-}$${API_KEYS_FILE:-}" ]; then echo "make run: no API_KEYS set, so DEV_MODE=true: no key needed, every request is tenant \"default\" (local use only)"; fi
	eval "$$(scripts/stack.sh env)" && if [ -z "$${API_KEYS:-}$${API_KEYS_FILE:-}" ]; then export DEV_MODE=true; fi && exec target/release/comm-aggregator

stack-up:
	SANDBOX_BIN=$(if $(wildcard target/release/provider-sandbox),target/release/provider-sandbox,) scripts/stack.sh up

stack-down:
	scripts/stack.sh down

stack-status:
	scripts/stack.sh status

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	python3 scripts/fn-length.py 80

# Installs what the tests need (Debian redis-server, the .venv servers), checks format and
# lints, then runs every test; the tests start their own servers on free ports.
test:
	scripts/stack.sh install
	$(MAKE) lint
	cargo test --workspace

bench:
	cargo bench --bench hot_paths

# The Performance section's figures (see README); LOAD_ARGS for loadgen, e.g. "--seconds 60".
load:
	scripts/stack.sh install
	scripts/load.sh $(LOAD_ARGS)

# Accepts first (issue #14): accept latency at a fixed rate (default 300 requests/s for 60 s)
# with the pipeline delivering, the adaptive store limiter on and off in alternate rounds,
# each on a fresh stack of its own (README "Performance"); LOAD_ARGS for loadgen, ROUNDS.
load-accepts-first:
	scripts/stack.sh install
	scripts/accepts-first.sh $(LOAD_ARGS)

bench-indexer:
	scripts/stack.sh install
	cargo bench --bench log_indexer

# What one message costs Redis, MongoDB, Elasticsearch and each process's CPU, for the accept
# path alone and end to end, on a stack of its own (README "Performance"); COSTS_ARGS for
# loadgen, e.g. "--messages 3000 --connections 16".
bench-costs:
	scripts/stack.sh install
	scripts/costs.sh $(COSTS_ARGS)

# The service's own work a message in instructions (valgrind's callgrind), end to end on a
# stack of its own: a figure the machine's load does not move (README "Performance");
# INSTR_ARGS for loadgen, e.g. "--messages 2000".
bench-instructions:
	scripts/stack.sh install
	scripts/service-instructions.sh $(INSTR_ARGS)
