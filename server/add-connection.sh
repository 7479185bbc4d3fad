#!/usr/bin/env bash
# Tell `flwr` how to reach the SuperLink: adds a TLS connection to $FLWR_HOME/config.toml
# (default ~/.flwr) and makes it the default.
#
#   server/add-connection.sh NAME HOST:PORT CA_CERT
#
# Then: flwr supernode register SITE.pub NAME; flwr run . NAME --stream --run-config '...'
set -euo pipefail
fail() { echo "add-connection: $*" >&2; exit 2; }
[[ $# -eq 3 ]] || fail "usage: server/add-connection.sh NAME HOST:PORT CA_CERT"
name=$1 address=$2 ca=$3
[[ $name =~ ^[A-Za-z0-9_-]+$ ]] || fail "connection name '$name': use letters, digits, '_' and '-'"
[[ $address == *:* ]] || fail "address '$address': expected HOST:PORT"
[[ -f $ca ]] || fail "$ca not found (the federation's ca.crt)"
home=${FLWR_HOME:-$HOME/.flwr}
config=$home/config.toml
mkdir -p "$home"
touch "$config"
grep -q "^\[superlink\.$name\]" "$config" && fail "$config already has a connection '$name'; edit or remove it there"
python3 - "$config" "$name" "$address" "$(cd "$(dirname "$ca")" && pwd)/$(basename "$ca")" <<'PY'
import sys, tomllib
path, name, address, ca = sys.argv[1:]
text = open(path).read()
tomllib.loads(text)  # refuse to append to a file that is not valid TOML
if "[superlink]" in text:
    import re
    text = re.sub(r'(?m)^default\s*=.*$', f'default = "{name}"', text, count=1)
else:
    text = f'[superlink]\ndefault = "{name}"\n\n' + text
text = text.rstrip("\n") + f'\n\n[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca}"\n'
tomllib.loads(text)
open(path, "w").write(text)
PY
echo "connection '$name' -> $address (TLS, CA $ca) written to $config"
