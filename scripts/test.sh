#!/usr/bin/env bash
# Runs every Causeway test: unit tests, integration tests against real etcd and the in-memory kube API stand-in,
# and (as root) the network-namespace and eBPF tests. Installs what it needs first.
#
#   scripts/test.sh            # all tests
#   scripts/test.sh -p identity-sync   # extra args go to cargo test
#
# Tests that need root, netns or BPF skip with a message when run unprivileged, unless
# CAUSEWAY_PRIVILEGED_TESTS=1 is set (CI sets it), in which case a missing privilege fails the test.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# Two cores: keep the test threads of one binary from starving the etcd processes they start.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
# The end-to-end tests (tests/multicluster) run the real binaries from target/debug. `cargo test` builds a package's
# binaries only for that package's own integration tests, so build every binary first (also keeps them fresh when
# extra args narrow the test run, e.g. `-p causeway-multicluster-tests`).
cargo build --workspace --bins --locked
cargo test --workspace --all-targets --locked --no-fail-fast "$@"
