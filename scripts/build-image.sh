#!/usr/bin/env bash
# Builds a runnable Ember image from binaries already built on this machine,
# without pulling anything from a registry: a `FROM scratch` image holding
#   /usr/local/bin/{ps-server,worker,ember,ember-data,ember-healthcheck}
#   the shared libraries `ldd` lists for them and the dynamic loader,
#   /etc/passwd + /etc/group with a non-root user `ember` (10001:10001),
#   /etc/nsswitch.conf, /tmp (1777), /var/lib/ember/{checkpoints,runs} (owned
#   by ember), and a DejaVu font for curves.png when the host has one.
# Same user, PATH, ports, working directory, HEALTHCHECK and default command
# as the registry-based ./Dockerfile, so the two images are interchangeable in
# deploy/compose and deploy/k8s.
#
# Usage: scripts/build-image.sh [--tag TAG] [--bin-dir DIR] [--strip] [--keep-context]
#   --tag TAG       image tag (default $EMBER_IMAGE or ember:local)
#   --bin-dir DIR   where the binaries are (default target/debug; build them
#                   first with `cargo build --workspace --bins`)
#   --strip         strip the copied binaries (smaller image, no symbols in backtraces)
#   --keep-context  keep the build context directory and print its path
#
# Needs: docker (daemon reachable), ldd, rustc (compiles the 100-line
# deploy/docker/healthcheck.rs; std only). Runs as any user.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TAG=${EMBER_IMAGE:-ember:local}
BIN_DIR=$ROOT/target/debug
STRIP=0
KEEP=0
BINS=(ps-server worker ember ember-data)
EMBER_ID=10001

while [ $# -gt 0 ]; do
  case "$1" in
    --tag) TAG=$2; shift 2 ;;
    --bin-dir) BIN_DIR=$2; shift 2 ;;
    --strip) STRIP=1; shift ;;
    --keep-context) KEEP=1; shift ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "build-image: $*" >&2; exit 1; }

command -v docker >/dev/null || die "docker not found"
command -v ldd >/dev/null || die "ldd not found (needed to collect shared libraries)"
command -v rustc >/dev/null || die "rustc not found (needed to compile deploy/docker/healthcheck.rs)"
BIN_DIR=$(cd "$BIN_DIR" 2>/dev/null && pwd) || die "binary directory $BIN_DIR does not exist"
for b in "${BINS[@]}"; do
  [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b missing; build it: cargo build --workspace --bins"
done

CTX=$(mktemp -d "${TMPDIR:-/tmp}/ember-image.XXXXXX")
if [ "$KEEP" = 1 ]; then
  echo "build-image: context kept in $CTX"
else
  trap 'rm -rf "$CTX"' EXIT
fi
R=$CTX/rootfs
S=$CTX/state
mkdir -p "$R/usr/local/bin" "$R/etc" "$R/tmp" "$S/checkpoints" "$S/runs"
chmod 1777 "$R/tmp"
chmod 755 "$S" "$S/checkpoints" "$S/runs"

# 1. Binaries.
for b in "${BINS[@]}"; do
  cp -L "$BIN_DIR/$b" "$R/usr/local/bin/$b"
done
rustc --edition 2021 -C opt-level=2 -C debuginfo=0 \
  -o "$R/usr/local/bin/ember-healthcheck" "$ROOT/deploy/docker/healthcheck.rs"
if [ "$STRIP" = 1 ]; then
  command -v strip >/dev/null || die "--strip: strip not found"
  strip "$R"/usr/local/bin/*
fi
chmod 755 "$R"/usr/local/bin/*

# 2. Shared libraries and the loader, at the paths ldd reports (these are in
#    the loader's built-in search path, so no ld.so.cache is needed).
libs=()
for f in "$R"/usr/local/bin/*; do
  out=$(ldd "$f" 2>&1) || { echo "$out" | grep -q "not a dynamic executable" && continue; die "ldd $f: $out"; }
  if echo "$out" | grep -q "not found"; then
    die "ldd $f: missing libraries:"$'\n'"$(echo "$out" | grep 'not found')"
  fi
  while read -r p; do libs+=("$p"); done < <(
    echo "$out" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
  )
done
for p in $(printf '%s\n' "${libs[@]}" | sort -u); do
  mkdir -p "$R$(dirname "$p")"
  cp -L "$p" "$R$p"
done

# 3. Users, name service, font.
cat >"$R/etc/passwd" <<EOF
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
ember:x:$EMBER_ID:$EMBER_ID:ember:/var/lib/ember:/sbin/nologin
EOF
cat >"$R/etc/group" <<EOF
root:x:0:
nogroup:x:65534:
ember:x:$EMBER_ID:
EOF
printf 'hosts: files dns\n' >"$R/etc/nsswitch.conf"
for font in /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf /usr/share/fonts/dejavu/DejaVuSans.ttf; do
  if [ -f "$font" ]; then
    mkdir -p "$R/usr/share/fonts/truetype/dejavu"
    cp -L "$font" "$R/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    break
  fi
done

# 4. The image. Keep in sync with ./Dockerfile (runtime stage).
REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
cat >"$CTX/Dockerfile" <<EOF
FROM scratch
COPY rootfs/ /
COPY --chown=$EMBER_ID:$EMBER_ID state/ /var/lib/ember/
ENV PATH=/usr/local/bin \\
    EMBER_BIN_DIR=/usr/local/bin \\
    HOME=/var/lib/ember \\
    RUST_BACKTRACE=1
USER $EMBER_ID:$EMBER_ID
WORKDIR /var/lib/ember
EXPOSE 50051 9100
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 CMD ["ember-healthcheck"]
LABEL org.opencontainers.image.title="ember" \\
      org.opencontainers.image.description="Ember parameter-server trainer (local scratch image)" \\
      org.opencontainers.image.revision="$REV"
CMD ["ps-server", "--help"]
EOF

echo "build-image: building $TAG from $BIN_DIR ($(du -sh "$R" | cut -f1))"
docker build --quiet -t "$TAG" "$CTX" >/dev/null
echo "build-image: built $TAG"
echo "  try: docker run --rm $TAG ps-server --help"
