set -euo pipefail

ROOT="${CAUSEWAY_JOIN_ROOT:-}"
START=1
if [ -n "$ROOT" ] || [ "${CAUSEWAY_JOIN_NO_START:-}" = 1 ]; then START=0; fi
AGENT_SRC="${CAUSEWAY_AGENT_BINARY:-$DEFAULT_AGENT}"
SYNC_SRC="${CAUSEWAY_IDENTITY_SYNC_BINARY:-$DEFAULT_IDENTITY_SYNC}"
ETCD_ENDPOINT="${CAUSEWAY_ETCD_ENDPOINT:-$DEFAULT_ETCD_ENDPOINT}"
WORKLOADS_ENDPOINT="${CAUSEWAY_WORKLOADS_ENDPOINT:-$DEFAULT_WORKLOADS_ENDPOINT}"
WG_IF="${CAUSEWAY_WIREGUARD_INTERFACE:-cw_wg}"
BPFFS_ROOT="${CAUSEWAY_BPFFS_ROOT:-/sys/fs/bpf/causeway}"
ETC="$ROOT/etc/causeway"
STATE="$ROOT/var/lib/causeway"
BIN="$ROOT/usr/local/bin"
UNITS="$ROOT/etc/systemd/system"
RESOLV="$ROOT/etc/resolv.conf"
RESOLVED_DROPIN="$ROOT/etc/systemd/resolved.conf.d/causeway.conf"
# identity-sync serves the mesh view to the node agent on loopback only.
SYNC_GRPC=127.0.0.1:9890
SYNC_METRICS=127.0.0.1:9891

step() { echo "causeway-join: $*"; }
die() { echo "causeway-join: error: $*" >&2; exit 1; }
# systemd-resolved manages this host's DNS (never under CAUSEWAY_JOIN_ROOT: that resolved is the host's, not the root's).
resolved_active() {
  [ -z "$ROOT" ] && command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet systemd-resolved
}
# The agent, with the environment its unit gets (node-agent.env, then workload.env).
agent_with_env() {
  (
    set -a
    . "$ETC/node-agent.env"
    if [ -f "$ETC/workload.env" ]; then . "$ETC/workload.env"; fi
    set +a
    exec "$BIN/causeway-node-agent" "$@"
  )
}

if [ "${1:-}" = uninstall ]; then
  if [ "$START" = 1 ] && command -v systemctl >/dev/null 2>&1; then
    step "stopping and disabling causeway-node-agent.service and causeway-identity-sync.service"
    systemctl disable --now causeway-node-agent.service causeway-identity-sync.service || true
  fi
  if [ -x "$BIN/causeway-node-agent" ] && [ -f "$ETC/node-agent.env" ]; then
    WG_IF="$(sed -n 's/^CAUSEWAY_WIREGUARD_INTERFACE=//p' "$ETC/node-agent.env" | head -n1)"
    step "removing the WireGuard interface ${WG_IF:-cw_wg} and the datapath: causeway-node-agent --uninstall --wireguard-interface ${WG_IF:-cw_wg}"
    agent_with_env --uninstall --wireguard-interface "${WG_IF:-cw_wg}" || step "warning: causeway-node-agent --uninstall failed (see above)"
  fi
  if [ -f "$RESOLVED_DROPIN" ]; then
    step "removing $RESOLVED_DROPIN"
    rm -f "$RESOLVED_DROPIN"
    if resolved_active; then systemctl restart systemd-resolved || true; fi
  fi
  if [ -e "$ETC/resolv.conf.orig" ] || [ -L "$ETC/resolv.conf.orig" ]; then
    step "restoring $RESOLV from $ETC/resolv.conf.orig"
    mv -f "$ETC/resolv.conf.orig" "$RESOLV"
  elif [ -f "$ETC/resolv.conf.absent" ]; then
    step "removing $RESOLV (there was none before the join)"
    rm -f "$RESOLV"
  fi
  step "removing $UNITS/causeway-node-agent.service, $UNITS/causeway-identity-sync.service, $BIN/causeway-node-agent, $BIN/causeway-identity-sync, $ETC, $STATE"
  rm -f "$UNITS/causeway-node-agent.service" "$UNITS/causeway-identity-sync.service" \
    "$BIN/causeway-node-agent" "$BIN/causeway-identity-sync"
  rm -rf "$ETC" "$STATE"
  if [ -z "$ROOT" ] && command -v systemctl >/dev/null 2>&1; then systemctl daemon-reload || true; fi
  step "uninstalled"
  exit 0
fi

NODE_IP="${CAUSEWAY_NODE_IP:-$(ip -o route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([^ ]*\).*/\1/p')}"
[ -n "$NODE_IP" ] || die "cannot find this host's IP (no default route?); set CAUSEWAY_NODE_IP"
[ -f "$AGENT_SRC" ] || die "node agent binary $AGENT_SRC not found; set CAUSEWAY_AGENT_BINARY"
[ -f "$SYNC_SRC" ] || die "identity-sync binary $SYNC_SRC not found; set CAUSEWAY_IDENTITY_SYNC_BINARY"
[ -n "$ETCD_ENDPOINT" ] || die "the cluster's etcd endpoint is unknown (the clustermesh-apiserver Service has no usable address): set CAUSEWAY_ETCD_ENDPOINT=https://HOST:PORT or pass --etcd-endpoint to causeway external-workload install"
[ -n "$WORKLOADS_ENDPOINT" ] || die "the registration endpoint is unknown (the clustermesh-apiserver Service has no port named workloads): set CAUSEWAY_WORKLOADS_ENDPOINT=https://HOST:PORT or pass --workloads-endpoint to causeway external-workload install"
step "joining $WORKLOAD_NAME ($NODE_IP) to cluster $CLUSTER_NAME (ID $CLUSTER_ID)"

step "installing the node agent $AGENT_SRC as $BIN/causeway-node-agent"
install -D -m 0755 "$AGENT_SRC" "$BIN/causeway-node-agent"
step "installing identity-sync $SYNC_SRC as $BIN/causeway-identity-sync"
install -D -m 0755 "$SYNC_SRC" "$BIN/causeway-identity-sync"

step "writing the externalworkload certificates to $ETC/certs (key mode 0600)"
install -d -m 0700 "$ETC/certs"
write_ca_crt > "$ETC/certs/ca.crt"
write_tls_crt > "$ETC/certs/tls.crt"
(umask 077 && write_tls_key > "$ETC/certs/tls.key")

step "writing identity-sync's remote config $ETC/remotes/$CLUSTER_NAME (etcd $ETCD_ENDPOINT, the externalworkload certificate)"
install -d -m 0700 "$ETC/remotes"
{
  echo "endpoints:"
  echo "- $ETCD_ENDPOINT"
  echo "trusted-ca-file: $ETC/certs/ca.crt"
  echo "cert-file: $ETC/certs/tls.crt"
  echo "key-file: $ETC/certs/tls.key"
  # The address dialed (a NodePort or load balancer) need not be in etcd's certificate; this name always is.
  echo "tls-server-name: clustermesh-apiserver"
} > "$ETC/remotes/$CLUSTER_NAME"

step "registering with the clustermesh-apiserver at $WORKLOADS_ENDPOINT over mTLS (WireGuard key: $STATE/wireguard.key) into $ETC/workload.env"
install -d -m 0700 "$STATE"
"$BIN/causeway-node-agent" register --name "$WORKLOAD_NAME" --apiserver "$WORKLOADS_ENDPOINT" \
  --ca "$ETC/certs/ca.crt" --cert "$ETC/certs/tls.crt" --key "$ETC/certs/tls.key" --node-ip "$NODE_IP" \
  --state-dir "$STATE" --out "$ETC/workload.env" --timeout "${CAUSEWAY_REGISTER_TIMEOUT:-2m}" \
  || die "registration failed (see above); nothing was started. Fix it and run this script again"
registered() { sed -n "s/^$1=//p" "$ETC/workload.env" | head -n1; }
IDENTITY="$(registered CAUSEWAY_WORKLOAD_IDENTITY)"
MESH_IPV4="$(registered CAUSEWAY_MESH_IPV4)"
CLUSTER_DNS="$(registered CAUSEWAY_CLUSTER_DNS)"
CLUSTER_DOMAIN="$(registered CAUSEWAY_CLUSTER_DOMAIN)"
CLUSTER_DOMAIN="${CLUSTER_DOMAIN:-cluster.local}"
step "registered: identity ${IDENTITY:-?}, mesh address ${MESH_IPV4:-none}, cluster DNS ${CLUSTER_DNS:-none}, domain $CLUSTER_DOMAIN"

step "writing $ETC/identity-sync.env (mirrors cluster $CLUSTER_NAME, serves the mesh view on $SYNC_GRPC) and $ETC/node-agent.env (WireGuard interface $WG_IF)"
{
  echo "CAUSEWAY_CLUSTER_NAME=$CLUSTER_NAME"
  echo "CAUSEWAY_CLUSTER_ID=$CLUSTER_ID"
  echo "CAUSEWAY_MAX_CONNECTED_CLUSTERS=$MAX_CONNECTED_CLUSTERS"
  echo "CAUSEWAY_REMOTES_DIR=$ETC/remotes"
  echo "CAUSEWAY_GRPC_ADDR=$SYNC_GRPC"
  echo "CAUSEWAY_METRICS_ADDR=$SYNC_METRICS"
} > "$ETC/identity-sync.env"
{
  echo "CAUSEWAY_NODE_NAME=$WORKLOAD_NAME"
  echo "CAUSEWAY_NODE_IP=$NODE_IP"
  echo "CAUSEWAY_IDENTITY_SYNC_ADDR=http://$SYNC_GRPC"
  echo "CAUSEWAY_WIREGUARD_INTERFACE=$WG_IF"
  echo "CAUSEWAY_STATE_DIR=$STATE"
  echo "CAUSEWAY_BPFFS_ROOT=$BPFFS_ROOT"
  echo "CAUSEWAY_METRICS_ADDR=127.0.0.1:9964"
  echo "CAUSEWAY_PROBE_ADDR=127.0.0.1:9966"
} > "$ETC/node-agent.env"

if [ -z "$CLUSTER_DNS" ]; then
  step "warning: the cluster reported no DNS server (no kube-dns Service?): cluster names will not resolve on this host"
elif resolved_active; then
  step "systemd-resolved is active: writing $RESOLVED_DROPIN (DNS=$CLUSTER_DNS, Domains=~$CLUSTER_DOMAIN) and restarting it"
  install -d "$(dirname "$RESOLVED_DROPIN")"
  printf '[Resolve]\nDNS=%s\nDomains=~%s\n' "$CLUSTER_DNS" "$CLUSTER_DOMAIN" > "$RESOLVED_DROPIN"
  systemctl restart systemd-resolved
else
  if [ -n "$ROOT" ] && [ ! -e "$RESOLV" ] && [ -e /etc/resolv.conf ]; then
    step "copying the host's /etc/resolv.conf to $RESOLV"
    install -d "$ROOT/etc"
    cat /etc/resolv.conf > "$RESOLV"
  fi
  if [ -e "$ETC/resolv.conf.orig" ] || [ -L "$ETC/resolv.conf.orig" ] || [ -f "$ETC/resolv.conf.absent" ]; then
    step "keeping the backup from an earlier run"
  elif [ -e "$RESOLV" ] || [ -L "$RESOLV" ]; then
    step "backing up $RESOLV to $ETC/resolv.conf.orig"
    cp -P "$RESOLV" "$ETC/resolv.conf.orig"
  else
    : > "$ETC/resolv.conf.absent"
  fi
  ORIG="$ETC/resolv.conf.orig"
  [ -e "$ORIG" ] || ORIG=/dev/null
  step "writing $RESOLV: nameserver $CLUSTER_DNS first, search svc.$CLUSTER_DOMAIN $CLUSTER_DOMAIN"
  {
    echo "# Written by the Causeway join script; the original is $ETC/resolv.conf.orig (uninstall restores it)."
    echo "nameserver $CLUSTER_DNS"
    { grep -E '^[[:space:]]*nameserver[[:space:]]' "$ORIG" || true; } | grep -vwF "$CLUSTER_DNS" | head -n 2 || true
    echo "search svc.$CLUSTER_DOMAIN $CLUSTER_DOMAIN $(sed -n 's/^[[:space:]]*\(search\|domain\)[[:space:]]*//p' "$ORIG" | tail -n1)"
    grep -E '^[[:space:]]*options[[:space:]]' "$ORIG" || true
  } > "$RESOLV.causeway-new"
  mv -f "$RESOLV.causeway-new" "$RESOLV"
fi

step "writing $UNITS/causeway-identity-sync.service and $UNITS/causeway-node-agent.service"
install -d "$UNITS"
cat > "$UNITS/causeway-identity-sync.service" <<UNIT
[Unit]
Description=Causeway identity-sync for external workload $WORKLOAD_NAME (mirrors cluster $CLUSTER_NAME)
After=network-online.target
Wants=network-online.target

[Service]
EnvironmentFile=$ETC/identity-sync.env
ExecStart=$BIN/causeway-identity-sync --external-workload
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
UNIT
cat > "$UNITS/causeway-node-agent.service" <<UNIT
[Unit]
Description=Causeway node agent for external workload $WORKLOAD_NAME (WireGuard $WG_IF into cluster $CLUSTER_NAME)
After=network-online.target causeway-identity-sync.service
Wants=network-online.target causeway-identity-sync.service

[Service]
EnvironmentFile=$ETC/node-agent.env
EnvironmentFile=$ETC/workload.env
ExecStart=$BIN/causeway-node-agent --identity-sync-addr http://$SYNC_GRPC --wireguard-interface $WG_IF
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
UNIT

DNS_NAME="kubernetes.default.svc.$CLUSTER_DOMAIN"
if [ "$START" = 0 ]; then
  step "not starting the services (CAUSEWAY_JOIN_ROOT or CAUSEWAY_JOIN_NO_START is set); start them with: systemctl daemon-reload && systemctl enable --now causeway-identity-sync.service causeway-node-agent.service"
  step "then check cluster DNS with: $BIN/causeway-node-agent check-dns --resolv-conf $RESOLV --name $DNS_NAME"
else
  step "starting causeway-identity-sync.service and causeway-node-agent.service"
  systemctl daemon-reload
  systemctl enable causeway-identity-sync.service causeway-node-agent.service
  # restart, not start: a second run (new certificates, a new registration) must reach running services.
  systemctl restart causeway-identity-sync.service causeway-node-agent.service
  DNS_WAIT="${CAUSEWAY_DNS_CHECK_SECONDS:-60}"
  step "checking cluster DNS: causeway-node-agent check-dns --name $DNS_NAME (for up to $DNS_WAIT s)"
  DEADLINE=$((SECONDS + DNS_WAIT))
  DNS_OK=0
  while [ "$SECONDS" -lt "$DEADLINE" ]; do
    if "$BIN/causeway-node-agent" check-dns --resolv-conf /etc/resolv.conf --name "$DNS_NAME" --timeout 10s; then
      DNS_OK=1
      break
    fi
    sleep 2
  done
  if [ "$DNS_OK" = 1 ]; then
    step "cluster DNS works: $DNS_NAME resolves"
  else
    step "warning: $DNS_NAME did not resolve within $DNS_WAIT s; check: systemctl status causeway-node-agent causeway-identity-sync; wg show $WG_IF; journalctl -u causeway-node-agent"
  fi
fi
step "done"
