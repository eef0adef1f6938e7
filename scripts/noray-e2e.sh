#!/usr/bin/env bash
# noray's own end-to-end tests against `natctl serve --noray` (needs root, node and npm).
#
#   sudo scripts/noray-e2e.sh PATH/TO/noray        # a checkout of github.com/foxssake/noray
#
# The tests run on a copy of the checkout whose test/e2e/context.mjs is told (E2E_EXTERNAL) to use a
# server started elsewhere instead of starting noray in-process. natctl serves in one network namespace
# (198.18.0.1), the tests run in another (198.18.0.2); they send UDP to localhost, so that namespace
# NATs localhost's registrar and relay ports to the relay, as a router would. Everything made is removed.
set -euo pipefail
src=${1:?usage: scripts/noray-e2e.sh PATH/TO/noray}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/natctl-noray-e2e.XXXXXX)
R=natctl-e2e-relay P=natctl-e2e-peers
cleanup() {
  ip netns pids $R 2>/dev/null | xargs -r kill 2>/dev/null || true
  sleep 0.3
  ip netns del $R 2>/dev/null || true
  ip netns del $P 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

cp -a "$src/." "$work/noray"
cd "$work/noray"
[ -d node_modules ] || npm install --omit=dev --no-audit --no-fund >/dev/null
python3 - test/e2e/context.mjs <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
s = s.replace("  async startup () {\n", "  async startup () {\n    if (process.env.E2E_EXTERNAL) { await sleep(0.1); return }\n", 1)
s = s.replace("  shutdown () {\n", "  shutdown () {\n    if (process.env.E2E_EXTERNAL) { this.#clients.forEach(c => c.destroy()); return }\n", 1)
open(p, "w").write(s)
PY

ip netns add $R; ip netns add $P
ip -n $R link set lo up; ip -n $P link set lo up
ip -n $R link add eth0 type veth peer name eth0 netns $P
ip -n $R addr add 198.18.0.1/24 dev eth0; ip -n $P addr add 198.18.0.2/24 dev eth0
ip -n $R link set eth0 up; ip -n $P link set eth0 up
ip netns exec $P sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.eth0.route_localnet=1
ip netns exec $P nft -f - <<'NFT'
table ip e2e {
  chain out {
    type nat hook output priority -100; policy accept;
    ip daddr 127.0.0.1 udp dport { 8809, 20000-29999 } dnat to 198.18.0.1
  }
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "eth0" ip saddr 127.0.0.1 masquerade
  }
}
NFT
NATCTL_CONFIG=/nonexistent NATCTL_RELAY_IP=198.18.0.1 ip netns exec $R \
  "$here/.venv/bin/natctl" --state "$work/natctl.db" serve --noray >"$work/serve.log" 2>&1 &
for _ in $(seq 50); do grep -q '"started"' "$work/serve.log" 2>/dev/null && break; sleep 0.1; done
sleep 0.3
E2E_EXTERNAL=1 NORAY_SOCKET_HOST=198.18.0.1 timeout 120 ip netns exec $P node --test test/e2e/ \
  | grep -E '^# (tests|pass|fail|skipped)|^not ok|^ok'
echo "natctl's log:"; cat "$work/serve.log"
