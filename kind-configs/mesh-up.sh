#!/usr/bin/env bash
# Builds a Causeway mesh out of kind clusters on this machine:
#
#   kind-configs/mesh-up.sh 2        # clusters east and west   (kind-configs/2-clusters)
#   kind-configs/mesh-up.sh 3        # clusters east, west and north (kind-configs/3-clusters)
#   kind-configs/mesh-up.sh 3 down   # delete them
#
# NEEDS Docker, kind, kubectl and helm, and is NOT run in CI (CI machines have no Docker). Steps: build the causeway
# image (kind-configs/Dockerfile) and the CLI, create each cluster from <dir>/<name>.kind.yaml, load the image,
# install charts/causeway with <dir>/<name>.values.yaml, then `causeway clustermesh enable` in every cluster,
# `causeway clustermesh connect` for every pair, and `causeway clustermesh status --wait` until all are synced.
set -euo pipefail
cd "$(dirname "$0")/.."

size="${1:-2}"
action="${2:-up}"
dir="kind-configs/${size}-clusters"
[ -d "$dir" ] || { echo "usage: $0 2|3 [up|down]  (no $dir)" >&2; exit 2; }

clusters=()
for f in "$dir"/*.kind.yaml; do
  clusters+=("$(basename "$f" .kind.yaml)")
done

if [ "$action" = down ]; then
  for c in "${clusters[@]}"; do kind delete cluster --name "$c"; done
  exit 0
fi
[ "$action" = up ] || { echo "usage: $0 2|3 [up|down]" >&2; exit 2; }

for tool in docker kind kubectl helm cargo; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found; this script needs Docker, kind, kubectl, helm and cargo" >&2; exit 1; }
done
docker info >/dev/null 2>&1 || { echo "error: Docker is not running" >&2; exit 1; }

echo "== building the causeway image and CLI"
docker build -f kind-configs/Dockerfile -t causeway:dev .
cargo build --release -p causeway --bin causeway
causeway=target/release/causeway

for c in "${clusters[@]}"; do
  echo "== cluster $c"
  if ! kind get clusters | grep -qx "$c"; then
    kind create cluster --config "$dir/$c.kind.yaml" --wait 120s
  fi
  kind load docker-image causeway:dev --name "$c"
  helm upgrade --install causeway charts/causeway --kube-context "kind-$c" --namespace causeway --create-namespace \
    --values "$dir/$c.values.yaml" --wait=false
done

# Certificates and Secrets (idempotent; the name and ID must be the ones in the values, which the chart put in the
# causeway-config ConfigMap), then the peer configs, pair by pair (connect writes both sides).
for c in "${clusters[@]}"; do
  id="$(awk '/^cluster:/ {in_cluster = 1; next} /^[^ ]/ {in_cluster = 0} in_cluster && $1 == "id:" {print $2}' \
    "$dir/$c.values.yaml")"
  "$causeway" clustermesh enable --context "kind-$c" --cluster-name "$c" --cluster-id "$id"
done
for ((i = 0; i < ${#clusters[@]}; i++)); do
  for ((j = i + 1; j < ${#clusters[@]}; j++)); do
    "$causeway" clustermesh connect --context "kind-${clusters[$i]}" --destination-context "kind-${clusters[$j]}"
  done
done
# connect records each peer in causeway-config's `peers`; each apiserver follows that ConfigMap
# (--peers-configmap) and creates the read-only etcd user remote-<peer> while it runs: no restart.
for c in "${clusters[@]}"; do
  "$causeway" clustermesh status --context "kind-$c" --wait
done
echo "mesh of ${clusters[*]} is up; delete it with: $0 $size down"
