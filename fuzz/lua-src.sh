#!/usr/bin/env bash
# Builds Lua 5.4.4 from Debian's source tarball for the fuzz and sanitizer builds only:
# API checks on (LUA_USE_APICHECK: a C function that pushes past its stack slots or misuses an
# index aborts at once) and ASan+UBSan that stop at the first report. Produces, under
# build/fuzz/lua-5.4.4/src/:
#   liblua.a  the library the fuzz harnesses link
#   lua       an interpreter for `make asan`, linked with -Wl,-E so Debian's Lua C modules
#             (lua-term, lua-system, lfs: what busted loads) resolve their Lua symbols in it
# The sources are never committed; the tarball is pinned by its sha256 and fetched from the
# Debian mirror this machine's apt already uses (or with `apt-get source` through a private
# sources list, never touching the system's apt configuration). Idempotent.
# Usage: fuzz/lua-src.sh            (CC defaults to clang; LUA_SRC_MIRROR overrides the mirror)
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=5.4.4
TARBALL=lua5.4_${VERSION}.orig.tar.gz
SHA256=164c7849653b80ae67bec4b7473b884bf5cc8d2dca05653475ec2ed27b9ebf61
OUT=build/fuzz
SRC=$OUT/lua-$VERSION
CC=${CC:-clang}
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all"
MYCFLAGS="-g -O1 -fno-omit-frame-pointer $SAN -DLUA_USE_APICHECK"
STAMP=$SRC/.built-$(printf '%s %s' "$CC" "$MYCFLAGS" | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ -f "$SRC/src/liblua.a" ] && [ -x "$SRC/src/lua" ]; then
  exit 0
fi
mkdir -p "$OUT"

# The first Debian archive URI of this machine's apt sources (deb822 and one-line formats).
debian_mirror() {
  if [ -n "${LUA_SRC_MIRROR:-}" ]; then echo "$LUA_SRC_MIRROR"; return; fi
  {
    grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -E 's/^URIs:[[:space:]]*//' | tr ' ' '\n'
    grep -hE '^deb(-src)?[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      sed -E 's/^deb(-src)?[[:space:]]+(\[[^]]*\][[:space:]]+)?//' | awk '{print $1}'
  } 2>/dev/null | grep -E '^https?://.*/debian/?$' | head -1 | sed -E 's#/$##' || true
}

verified() { [ -f "$1" ] && echo "$SHA256  $1" | sha256sum -c --quiet - 2>/dev/null; }

fetch_pool() { # straight from the archive's pool
  local mirror=$1
  curl -fsSL --retry 2 -o "$OUT/$TARBALL.part" "$mirror/pool/main/l/lua5.4/$TARBALL" &&
    mv "$OUT/$TARBALL.part" "$OUT/$TARBALL"
}

fetch_apt_source() { # apt-get source through a private sources list and private state
  local mirror=$1 suite apt dir
  suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  apt=$(cd "$OUT" && pwd)/apt
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/src"
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" >"$apt/sources.list"
  local opts=(-o "Dir::Etc::sourcelist=$apt/sources.list" -o "Dir::Etc::sourceparts=$apt/none"
    -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o APT::Sandbox::User=root -q)
  apt-get "${opts[@]}" update >/dev/null
  (cd "$apt/src" && apt-get "${opts[@]}" source --download-only "lua5.4" >/dev/null)
  dir=$apt/src/$TARBALL
  [ -f "$dir" ] && cp "$dir" "$OUT/$TARBALL"
}

if ! verified "$OUT/$TARBALL"; then
  rm -f "$OUT/$TARBALL"
  mirror=$(set +o pipefail; debian_mirror)
  if [ -z "$mirror" ]; then
    echo "lua-src.sh: no Debian mirror in /etc/apt/sources*; set LUA_SRC_MIRROR to one" >&2
    exit 1
  fi
  fetch_pool "$mirror" || { echo "lua-src.sh: pool download failed; trying apt-get source" >&2; fetch_apt_source "$mirror" || true; }
  if ! verified "$OUT/$TARBALL"; then
    echo "lua-src.sh: could not get $TARBALL with sha256 $SHA256" >&2
    rm -f "$OUT/$TARBALL"
    exit 1
  fi
fi

rm -rf "$SRC"
tar --no-same-owner -xzf "$OUT/$TARBALL" -C "$OUT"
# Upstream's own Makefile, as Debian builds it (LUA_COMPAT_5_3, POSIX, dlopen), plus the checks.
make -s -C "$SRC/src" -j"$(nproc)" linux-noreadline CC="$CC" AR="ar rc" MYCFLAGS="$MYCFLAGS" MYLDFLAGS="$SAN" >/dev/null
touch "$STAMP"
echo "lua-src.sh: built $SRC/src/liblua.a and $SRC/src/lua (APICHECK, ASan+UBSan)"
