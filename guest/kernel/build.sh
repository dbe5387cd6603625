#!/usr/bin/env bash
# Builds capvisor's minimal guest kernel from Debian's linux-source-6.1:
# x86_64 `allnoconfig` with capvisor.config forced in (everything built in,
# no modules).
#
# Usage: build.sh              build (or find in the cache) and print the directory
#        build.sh --print-dir  only print the directory the kernel is (or would be) in
#
# Output: $CACHE/kernels/minimal-<key>/{vmlinux,release,config}, where
# CACHE = $CAPVISOR_CACHE_DIR or ${XDG_CACHE_HOME:-~/.cache}/capvisor and key = the first 16
# hex digits of a SHA-256 over the fragment, the linux-source package
# version and this script. Progress lines ("kernel: ...") go to stdout; the
# last line of stdout is the directory. Nothing is rebuilt when it exists.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
fragment="$here/capvisor.config"
CACHE=${CAPVISOR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/capvisor}
PKG=linux-source-6.1
TARBALL=/usr/src/$PKG.tar.xz

say() { echo "kernel: $*"; }
die() { echo "kernel: error: $*" >&2; exit 1; }

[ -f "$fragment" ] || die "config fragment $fragment is missing"

# Which linux-source version: the installed package's (its tarball is in
# /usr/src), else apt's candidate (downloaded into $CACHE/debs).
installed=""
if [ -f "$TARBALL" ] && dpkg-query -W -f='${Status}\n' "$PKG" 2>/dev/null | grep -q ' installed$'; then
  installed=$(dpkg-query -W -f='${Version}' "$PKG")
fi
if [ -n "$installed" ]; then
  version=$installed
else
  version=$(apt-cache policy "$PKG" 2>/dev/null | awk '/Candidate:/ {print $2}')
  if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    die "apt knows no candidate for $PKG: run \`apt-get update\` (Debian bookworm's main archive has it)"
  fi
fi

key=$( { sha256sum <"$fragment"; echo "$PKG $version"; sha256sum <"$self"; } | sha256sum | cut -c1-16)
kernels="$CACHE/kernels"
dest="$kernels/minimal-$key"

if [ "${1:-}" = "--print-dir" ]; then
  echo "$dest"
  exit 0
fi
[ $# -eq 0 ] || die "unknown argument: $1 (usage: build.sh [--print-dir])"

complete() { [ -s "$dest/vmlinux" ] && [ -s "$dest/release" ] && [ -s "$dest/config" ]; }
if complete; then
  echo "$dest"
  exit 0
fi

# Build dependencies (Debian package per command / header).
need=()
for pair in gcc:gcc make:make bc:bc flex:flex bison:bison xz:xz-utils strip:binutils perl:perl; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
[ -f /usr/include/gelf.h ] || need+=(libelf-dev)   # objtool
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    die "missing build dependencies; install them with: sudo apt-get install ${need[*]}"
  fi
  say "installing build dependencies: ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2 \
    || die "apt-get install ${need[*]} failed (run \`apt-get update\` first?)"
fi

mkdir -p "$kernels"
# One builder per key at a time; a second one waits and then finds the result.
exec 9>"$kernels/.lock-minimal-$key"
if ! flock -n 9; then
  say "another build of minimal-$key is running; waiting for it"
  flock 9
fi
if complete; then
  echo "$dest"
  exit 0
fi

t0=$SECONDS
tmp=$(mktemp -d "$kernels/.build-minimal-$key-XXXXXX")
cleanup() {
  if [ "${CAPVISOR_KERNEL_KEEP_BUILD:-}" = 1 ]; then
    echo "kernel: build tree kept in $tmp" >&2
  else
    rm -rf "$tmp"
  fi
}
trap cleanup EXIT
log="$tmp/build.log"

# The source tarball.
if [ -n "$installed" ]; then
  src_tar=$TARBALL
  say "using $TARBALL ($PKG $version, installed)"
else
  debs="$CACHE/debs"
  mkdir -p "$debs"
  deb="$debs/${PKG}_${version//:/%3a}_all.deb"
  if [ ! -s "$deb" ]; then
    say "downloading $PKG $version ..."
    dl=$(mktemp -d "$debs/.dl-XXXXXX")
    chmod 755 "$dl"   # apt-get downloads as the `_apt` user when run as root
    if ! (cd "$dl" && apt-get download -q "$PKG=$version" >&2); then
      rm -rf "$dl"
      die "apt-get download $PKG=$version failed"
    fi
    mv -f "$dl"/*.deb "$deb"
    rm -rf "$dl"
  fi
  say "unpacking $(basename "$deb") ..."
  dpkg -x "$deb" "$tmp/pkg"
  src_tar="$tmp/pkg$TARBALL"
  [ -f "$src_tar" ] || die "$deb holds no $TARBALL"
fi

say "extracting the kernel source ..."
src="$tmp/src"
mkdir -p "$src"
tar -xf "$src_tar" -C "$src" --strip-components=1
rm -rf "$tmp/pkg"

mk=(make -C "$src" ARCH=x86_64 KBUILD_BUILD_USER=capvisor KBUILD_BUILD_HOST=capvisor
    "KBUILD_BUILD_TIMESTAMP=$PKG $version")

# `allnoconfig` with the fragment as KCONFIG_ALLCONFIG (what `merge_config.sh
# -n` does): the fragment's values are forced and every other visible option,
# including those the fragment makes visible, is "no". (Merging into an
# allnoconfig .config and running olddefconfig would give the newly visible
# ones their defaults: battery, fan, thermal... under ACPI.)
say "configuring (allnoconfig + $(basename "$fragment")) ..."
"${mk[@]}" KCONFIG_ALLCONFIG="$fragment" allnoconfig >>"$log" 2>&1 \
  || { tail -n 30 "$log" >&2; die "make allnoconfig failed"; }
"${mk[@]}" olddefconfig >>"$log" 2>&1 || { tail -n 30 "$log" >&2; die "make olddefconfig failed"; }

# Every option of the fragment must have survived olddefconfig.
missing=0
while IFS= read -r line; do
  if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
    want="$line"
    got=$(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$src/.config" || true)
    if [ "$got" != "$want" ]; then
      echo "kernel: fragment option not in effect: want '$want', got '${got:-<absent>}'" >&2
      missing=$((missing + 1))
    fi
  elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
    if got=$(grep -E "^${BASH_REMATCH[1]}=" "$src/.config"); then
      echo "kernel: fragment option not in effect: want '$line', got '$got'" >&2
      missing=$((missing + 1))
    fi
  fi
done <"$fragment"
[ "$missing" -eq 0 ] || die "$missing option(s) of $(basename "$fragment") did not take effect (see above)"

jobs=$(nproc)
say "compiling vmlinux with $jobs job(s) (a few minutes; log: $log) ..."
"${mk[@]}" -j"$jobs" vmlinux >>"$log" 2>&1 &
pid=$!
while kill -0 "$pid" 2>/dev/null; do
  for _ in $(seq 30); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "still compiling: $(grep -c '^  CC ' "$log" || true) files compiled, $((SECONDS - t0)) s"
  fi
done
wait "$pid" || { tail -n 40 "$log" >&2; die "make vmlinux failed"; }

out="$tmp/out"
mkdir -p "$out"
strip --strip-debug -o "$out/vmlinux" "$src/vmlinux"
"${mk[@]}" -s kernelrelease >"$out/release" 2>>"$log"
cp "$src/.config" "$out/config"
[ -s "$out/release" ] || die "make kernelrelease printed nothing"
if ! mv -T "$out" "$dest" 2>/dev/null; then
  complete || die "could not move the kernel to $dest"
fi
say "built $(cat "$dest/release"): $(du -h "$dest/vmlinux" | cut -f1) vmlinux in $((SECONDS - t0)) s"
echo "$dest"
