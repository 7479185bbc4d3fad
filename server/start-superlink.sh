#!/usr/bin/env bash
# Start the coordinator's Flower SuperLink with TLS and SuperNode authentication on.
#
#   server/start-superlink.sh PKI_DIR STATE_DIR [PORT] [extra flower-superlink options]
#
# PKI_DIR   what `fedmae pki ca` / `fedmae pki server` wrote: ca/ca.crt, server/server.pem, server/server.key
# STATE_DIR local disk (not NFS) for the SuperLink's database, superlink.db: the registered sites
#           and the runs. After a crash, restart with the same command: the SuperNodes reconnect by
#           themselves; continue the run with the same `flwr run` and resume=true (docs/deploy.md).
# PORT      the one port the hospitals dial (default 9091); bound on FEDMAE_HOST (default 0.0.0.0)
# Flower 1.42 serves sites, `flwr` commands and runs on PORT over HTTPS, and does not authenticate
# `flwr` commands: allow only the hospitals and this machine through the firewall (docs/deploy.md,
# "Security model"). Later options win.
set -euo pipefail
fail() { echo "start-superlink: $*" >&2; exit 2; }
[[ $# -ge 2 ]] || fail "usage: server/start-superlink.sh PKI_DIR STATE_DIR [PORT] [flower-superlink options]"
pki=$1 state=$2; shift 2
port=9091
if [[ $# -gt 0 && $1 != -* ]]; then port=$1; shift; fi
for file in ca/ca.crt server/server.pem server/server.key; do
  [[ -f $pki/$file ]] || fail "$pki/$file not found; create it with fedmae pki (docs/deploy.md, step 1)"
done
[[ $(stat -c %a "$pki/server/server.key") == 600 ]] || fail "$pki/server/server.key is readable by others; chmod 600 it"
mkdir -p "$state"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # sites and server preinstall fedmae
exec flower-superlink \
  --ssl-ca-certfile "$pki/ca/ca.crt" --ssl-certfile "$pki/server/server.pem" --ssl-keyfile "$pki/server/server.key" \
  --enable-supernode-auth --host "${FEDMAE_HOST:-0.0.0.0}" --port "$port" --database "$state/superlink.db" "$@"
