#!/usr/bin/env bash
# Cross-builds edge-agent for aarch64-unknown-linux-gnu (Jetson / JetPack 6, glibc ≥ 2.35).
# Installs what it needs (rustup target, aarch64 gcc, qemu-user) if missing; idempotent.
#
#   bash cross/build.sh          install what is missing, then build
#   bash cross/build.sh --deps   install what is missing, and stop
#
# CROSS_TARGET_DIR (default target) is the cargo target directory of the build: another
# one lets it run beside a build of the workspace (cargo locks a target directory).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-unknown-linux-gnu
case ${1:-} in
  "" | --deps) ;;
  *) echo "usage: bash cross/build.sh [--deps]" >&2; exit 2 ;;
esac

if ! rustup target list --installed | grep -qx "$TARGET"; then
  echo "cross: adding the Rust target $TARGET"
  if ! rustup target add "$TARGET"; then
    echo "cross: FAILED to add the Rust target $TARGET (no access to the Rust distribution server?)" >&2
    exit 1
  fi
fi
need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v curl >/dev/null || need+=(curl)
command -v file >/dev/null || need+=(file)
if [ ${#need[@]} -gt 0 ]; then
  echo "cross: installing ${need[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

[ "${1:-}" = --deps ] && exit 0

DIR=${CROSS_TARGET_DIR:-target}
cargo --config cross/cargo-config.toml build --release --locked --target "$TARGET" \
  --target-dir "$DIR" -p edge-agent
BIN="$DIR/$TARGET/release/edge-agent"
file "$BIN" 2>/dev/null || true
echo "cross: built $BIN"
