#!/usr/bin/env bash
# Interop test: a pycapnp client (the C++ Cap'n Proto library) against a
# real `capvisor serve` (scripts/interop/test_pycapnp.py). Installs pycapnp
# into a virtualenv cached under $CAPVISOR_CACHE_DIR (default
# ~/.cache/capvisor), keyed by requirements.txt's hash, then runs the test
# with it. Assumes `cargo build --workspace` was done (target/debug).
# Exit code: the test's.
#
# Needs: python3 with the venv module (Debian: apt-get install python3-venv),
# PyPI reachable by pip on the first run, the C++ library's stream.capnp
# (Debian: libcapnp-dev; pycapnp's bundled copy is the fallback).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
PYTHON=${PYTHON:-python3}
req="$here/requirements.txt"
hash=$(sha256sum "$req" | cut -c1-16)
venv="${CAPVISOR_CACHE_DIR:-$HOME/.cache/capvisor}/venv-pycapnp-$hash"

venv_ok() {
  [ -f "$venv/.complete" ] && "$venv/bin/python" -c 'import capnp' >/dev/null 2>&1
}

if ! venv_ok; then
  echo "interop: creating $venv"
  mkdir -p "$(dirname "$venv")"
  tmp="$venv.tmp.$$"
  rm -rf "$tmp"
  trap 'rm -rf "$tmp"' EXIT
  if ! "$PYTHON" -m venv "$tmp"; then
    echo "interop: '$PYTHON -m venv' failed. On Debian/Ubuntu install the venv module first:" >&2
    echo "interop:     apt-get install -y python3-venv" >&2
    exit 1
  fi
  "$tmp/bin/python" -m pip install -q --disable-pip-version-check --prefer-binary -r "$req"
  # Built in place elsewhere, then renamed: a half-made venv is never reused.
  # (A venv's scripts name their directory, so use python -m pip, never bin/pip.)
  touch "$tmp/.complete"
  rm -rf "$venv"
  mv "$tmp" "$venv"
  trap - EXIT
  venv_ok || { echo "interop: the venv at $venv does not import capnp" >&2; exit 1; }
fi

exec "$venv/bin/python" "$here/test_pycapnp.py" --repo "$repo" "$@"
