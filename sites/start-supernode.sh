#!/usr/bin/env bash
# Start a hospital's Flower SuperNode running the fedmae site (ClientApp), over TLS with the
# site's registered key.
#
#   sites/start-supernode.sh --superlink HOST:PORT --ca ca.crt --key SITE.key --site NAME \
#       [--data DATA_DIR] [--state STATE_DIR] [--port LOCAL_PORT] [-- extra flower-supernode options]
#
# --site   the name in every log and metric
# --data   this site's images, read with the experiment's data source (leave it out for the
#          built-in data: the site is then the built-in hospital of that name, e.g. site-0)
# --state  where the site keeps its decoder and optimiser between rounds
#          (default DATA_DIR/.fedmae-state, or ./fedmae-state/NAME without --data)
# --port   the SuperNode's local port; differs per SuperNode on one host (default 9094)
# After a crash, restart it with the same command about a minute later: until the SuperLink has
# missed two heartbeats (2 x 30 s) it counts the old session as online and refuses this one
# ("Failed to activate SuperNode", the process exits 1). A service manager can retry it
# (systemd: Restart=on-failure, RestartSec=20). The site continues from its state in --state.
set -euo pipefail
fail() { echo "start-supernode: $*" >&2; exit 2; }
superlink="" ca="" key="" site="" data="" state="" port=9094
while [[ $# -gt 0 ]]; do
  case $1 in
    --superlink) superlink=$2; shift 2 ;;
    --ca) ca=$2; shift 2 ;;
    --key) key=$2; shift 2 ;;
    --site) site=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --state) state=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --) shift; break ;;
    *) fail "unknown option $1 (see the header of this script)" ;;
  esac
done
for option in superlink ca key site; do
  [[ -n ${!option} ]] || fail "--$option is required (see the header of this script)"
done
[[ $superlink == *:* ]] || fail "--superlink '$superlink': expected HOST:PORT"
[[ -f $ca ]] || fail "--ca $ca not found (the federation's ca.crt)"
[[ -f $key ]] || fail "--key $key not found (create it with: fedmae pki site $site)"
[[ $(stat -c %a "$key") == 600 ]] || fail "$key is readable by others; chmod 600 it"
[[ $site =~ ^[A-Za-z0-9._-]+$ ]] || fail "--site '$site': use letters, digits, '.', '_' and '-'"
node_config="site=\"$site\""
if [[ -n $data ]]; then
  [[ -d $data ]] || fail "--data $data is not a folder"
  data=$(cd "$data" && pwd)
  node_config+=" data-dir=\"$data\""
  state=${state:-$data/.fedmae-state}
fi
state=${state:-fedmae-state/$site}
mkdir -p "$state"
state=$(cd "$state" && pwd)
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # fedmae is preinstalled at the site
exec flower-supernode --superlink "$superlink" --root-certificates "$ca" --auth-supernode-private-key "$key" \
  --node-config "$node_config state-dir=\"$state\"" --port "$port" "$@"
