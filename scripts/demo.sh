#!/usr/bin/env bash
# The main job: start capvisor on the embedded default manifest, log in by
# Unix credentials, boot a real Linux VM through capabilities, run commands
# in it, log out, shut down. Uses a private temporary socket, state and
# config; the guest image cache is the usual one (~/.cache/capvisor).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
work=$(mktemp -d /tmp/capvisor-demo.XXXXXX)
chmod 700 "$work"
export CAPVISOR_SOCKET="$work/run/gateway.sock"
export CAPVISOR_STATE_DIR="$work/state"
export CAPVISOR_CONFIG_DIR="$work/config"
serve_pid=""
cleanup() {
  if [ -n "$serve_pid" ]; then kill -TERM "$serve_pid" 2>/dev/null || true; wait "$serve_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

say "capvisor serve &"
CAPVISOR_LOG=${CAPVISOR_LOG:-warn} "$BIN/capvisor" serve &
serve_pid=$!
for _ in $(seq 1 600); do
  [ -S "$CAPVISOR_SOCKET" ] && break
  kill -0 "$serve_pid" 2>/dev/null || { echo "capvisor serve exited early" >&2; exit 1; }
  sleep 0.5
done
[ -S "$CAPVISOR_SOCKET" ] || { echo "capvisor serve did not come up" >&2; exit 1; }

say "capvisor login";            "$BIN/capvisor" login
say "capvisor caps";             "$BIN/capvisor" caps
say "capvisor vm create --name demo"; "$BIN/capvisor" vm create --name demo
say "capvisor vm exec demo -- uname -a"; "$BIN/capvisor" vm exec demo -- uname -a
say "echo 'hello from the host' | capvisor vm exec demo -- sh -c 'cat > /tmp/greeting; wc -c /tmp/greeting'"
echo 'hello from the host' | "$BIN/capvisor" vm exec demo -- sh -c 'cat > /tmp/greeting; wc -c /tmp/greeting'
say "capvisor vm exec demo -- sh -c 'exit 3'   (exit code comes back)"
set +e; "$BIN/capvisor" vm exec demo -- sh -c 'exit 3'; code=$?; set -e
echo "exit code: $code"
[ "$code" = 3 ] || { echo "expected 3" >&2; exit 1; }
say "capvisor vm list";          "$BIN/capvisor" vm list
say "capvisor vm rm demo";       "$BIN/capvisor" vm rm demo
say "capvisor run -- cat /proc/version"; "$BIN/capvisor" run -- cat /proc/version
say "capvisor logout";           "$BIN/capvisor" logout
echo
echo "demo finished: a real Linux guest answered commands sent through capabilities only."
