#!/usr/bin/env bash
# The local sandbox mesh: two clusters on loopback, each with etcd (mTLS), the in-memory kube API stand-in,
# clustermesh-apiserver and identity-sync, connected, with a demo global service.
#
#   scripts/sandbox.sh up       # install deps, build, start, print the merged view
#   scripts/sandbox.sh status
#   scripts/sandbox.sh down
set -euo pipefail
cd "$(dirname "$0")/.."
action="${1:-up}"
shift || true

if [ "$action" = "up" ]; then
  scripts/install-deps.sh
  cargo build --locked --bins -p causeway -p clustermesh-apiserver -p identity-sync -p fake-kube-apiserver
fi
exec target/debug/causeway sandbox "$action" "$@"
