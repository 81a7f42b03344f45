#!/usr/bin/env bash
# Installs the system packages Causeway's sandbox and tests use. Idempotent; needs root (or sudo) for apt-get.
# Packages: etcd (server + etcdctl), protoc (etcd-client and causeway-api build scripts), clang + libbpf headers
# (eBPF programs), bpftool, iproute2/nftables/iptables (network namespaces), wireguard-go + wg (interop peer),
# and traffic tools for the e2e tests.
set -euo pipefail

PKGS=(etcd-server etcd-client protobuf-compiler clang-19 libbpf-dev bpftool iproute2 nftables iptables
      wireguard-tools wireguard-go iperf3 iputils-ping curl socat)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# etcd-server's package starts a system etcd on 2379; the tests and sandbox start their own on free ports,
# so the system one is only in the way.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd || true
fi

for bin in etcd protoc; do
  command -v "$bin" >/dev/null || { echo "error: $bin not found after install" >&2; exit 1; }
done
