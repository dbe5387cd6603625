#!/usr/bin/env bash
# Installs the MCP clients cli/tests/mcp.rs drives `capvisor mcp` with, into
# cache directories keyed by what is installed (so a warm machine skips it):
#   $CAPVISOR_CACHE_DIR/mcp-venv-<hash of requirements.txt>   PyPI `mcp` in a venv
#   $CAPVISOR_CACHE_DIR/mcp-npm-<hash of package-lock.json>   npm `@modelcontextprotocol/sdk`
#                                                             and `@modelcontextprotocol/inspector`
# (CAPVISOR_CACHE_DIR defaults to ~/.cache/capvisor.) Each is built beside its
# final place and renamed into it when complete: a half-made one is never used.
#
#   setup.sh           install what is missing, then print the two paths
#   setup.sh --where   print the paths (`venv=...`, `npm=...`) and install nothing;
#                      exit 3 if either is not installed
#
# Needs python3 with the venv module (Debian: python3-venv), node and npm, and
# PyPI and the npm registry reachable on the first run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${CAPVISOR_CACHE_DIR:-$HOME/.cache/capvisor}
PYTHON=${PYTHON:-python3}
venv="$cache/mcp-venv-$(sha256sum "$here/requirements.txt" | cut -c1-16)"
npmdir="$cache/mcp-npm-$(cat "$here/package.json" "$here/package-lock.json" | sha256sum | cut -c1-16)"

venv_ok() { [ -f "$venv/.complete" ] && "$venv/bin/python" -c 'import mcp.client.stdio' >/dev/null 2>&1; }
npm_ok() { [ -f "$npmdir/.complete" ] && [ -d "$npmdir/node_modules/@modelcontextprotocol/sdk" ]; }

if [ "${1:-}" = "--where" ]; then
  echo "venv=$venv"
  echo "npm=$npmdir"
  venv_ok && npm_ok || exit 3
  exit 0
fi

mkdir -p "$cache"
if ! venv_ok; then
  echo "mcp setup: creating $venv" >&2
  tmp="$venv.tmp.$$"
  rm -rf "$tmp"
  "$PYTHON" -m venv "$tmp"
  # A venv's scripts name their directory: use python -m pip, never bin/pip.
  "$tmp/bin/python" -m pip install -q --disable-pip-version-check --prefer-binary -r "$here/requirements.txt"
  touch "$tmp/.complete"
  rm -rf "$venv"
  mv "$tmp" "$venv"
  venv_ok || { echo "mcp setup: the venv at $venv does not import mcp" >&2; exit 1; }
fi
if ! npm_ok; then
  echo "mcp setup: installing npm packages into $npmdir" >&2
  tmp="$npmdir.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  cp "$here/package.json" "$here/package-lock.json" "$tmp/"
  # The lock file pins every package: `npm ci` installs exactly it.
  (cd "$tmp" && npm ci --no-audit --no-fund --loglevel=error) >&2
  touch "$tmp/.complete"
  rm -rf "$npmdir"
  mv "$tmp" "$npmdir"
  npm_ok || { echo "mcp setup: $npmdir lacks @modelcontextprotocol/sdk" >&2; exit 1; }
fi
echo "venv=$venv"
echo "npm=$npmdir"
