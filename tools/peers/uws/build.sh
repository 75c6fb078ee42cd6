#!/usr/bin/env bash
# Builds the uWebSockets peer (tools/peers/uws/main.cpp) for perf/compare.sh from the pinned
# uWebSockets and uSockets commits, in a temporary folder; nothing of their sources is kept
# in this repository or left behind.
#
#   UWS_REPO=<git URL or clone of uNetworking/uWebSockets> \
#   USOCKETS_REPO=<git URL or clone of uNetworking/uSockets> \
#     tools/peers/uws/build.sh [OUT]        # OUT defaults to target/uws-peer
#   UWS_PEER=target/uws-peer perf/compare.sh
#
# Each *_REPO is anything `git clone` takes (a URL or a local clone). The script clones it
# into a temporary folder, checks out the pinned commit below (it fails if the commit is not
# there), and compiles: uSockets' C sources with its epoll loop and no SSL, the peer with
# uWebSockets' headers, no compression, -O3 for generic x86-64 (like tickgate's release
# build), linked with OpenSSL's libcrypto for the token's Ed25519 signature. Needs g++,
# gcc and libssl-dev (Debian: `apt-get install g++ libssl-dev`).
set -euo pipefail

# The commits perf/RESULTS.md's uWebSockets figures were measured with: uWebSockets master
# of 2026-08-18 and the uSockets commit its submodule points at.
UWS_COMMIT=66dcff3dd48f0c19dd1703426365d062039321d0
USOCKETS_COMMIT=86097c490263ab662d62e8e7b541390bdec7d149

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
OUT=${1:-$ROOT/target/uws-peer}
: "${UWS_REPO:?set UWS_REPO to a git URL or a local clone of uNetworking/uWebSockets}"
: "${USOCKETS_REPO:?set USOCKETS_REPO to a git URL or a local clone of uNetworking/uSockets}"
for tool in git gcc g++; do
  command -v "$tool" >/dev/null || { echo "build.sh: needs $tool" >&2; exit 1; }
done
[[ -e /usr/include/openssl/evp.h ]] || { echo "build.sh: needs OpenSSL's headers (apt-get install libssl-dev)" >&2; exit 1; }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

checkout() { # REPO COMMIT DIR
  git clone -q --no-checkout "$1" "$3"
  git -C "$3" -c advice.detachedHead=false checkout -q "$2" ||
    { echo "build.sh: $1 has no commit $2" >&2; exit 1; }
  [[ $(git -C "$3" rev-parse HEAD) == "$2" ]]
}
checkout "$UWS_REPO" "$UWS_COMMIT" "$TMP/uWebSockets"
checkout "$USOCKETS_REPO" "$USOCKETS_COMMIT" "$TMP/uSockets"

FLAGS=(-O3 -march=x86-64 -DLIBUS_NO_SSL -DUWS_NO_ZLIB -flto)
US="$TMP/uSockets/src"
mkdir -p "$TMP/obj"
for c in "$US"/*.c "$US"/eventing/epoll_kqueue.c; do
  gcc -std=c11 "${FLAGS[@]}" -I"$US" -c "$c" -o "$TMP/obj/$(basename "$c" .c).o"
done
mkdir -p "$(dirname "$OUT")"
g++ -std=c++20 "${FLAGS[@]}" -I"$US" -I"$TMP/uWebSockets/src" \
  "$HERE/main.cpp" "$TMP"/obj/*.o -lcrypto -o "$OUT"
echo "built $OUT (uWebSockets ${UWS_COMMIT:0:7}, uSockets ${USOCKETS_COMMIT:0:7})"
