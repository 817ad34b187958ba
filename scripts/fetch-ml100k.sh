#!/usr/bin/env bash
# Fetch MovieLens-100k (GroupLens terms: research use, no redistribution) into
# DATA_DIR (default: data/ml-100k under the repository root, gitignored).
#
# The recbole==1.2.1 wheel on PyPI ships the full data set; we download the
# wheel with pip (no install), extract the three files (ml-100k.inter, the
# ratings; ml-100k.item, the movies; ml-100k.user, the user profiles: user_id,
# age, gender, occupation, zip_code) with python's zipfile, and verify their
# sha256 (see shared/DATA.md). A re-run is a no-op when all three files are
# present and valid. Needs only python3 with pip.
#
# Usage: scripts/fetch-ml100k.sh [DATA_DIR]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="${1:-$ROOT/data/ml-100k}"

INTER_SHA=4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff
ITEM_SHA=51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532
USER_SHA=4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972
WHEEL_SPEC="recbole==1.2.1"
MEMBER_DIR="recbole/dataset_example/ml-100k"

sha256_of() {
    python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
}

# valid FILE EXPECTED_SHA -> 0 if the file exists and matches.
valid() {
    [ -f "$1" ] && [ "$(sha256_of "$1")" = "$2" ]
}

if valid "$DATA_DIR/ml-100k.inter" "$INTER_SHA" && valid "$DATA_DIR/ml-100k.item" "$ITEM_SHA" \
    && valid "$DATA_DIR/ml-100k.user" "$USER_SHA"; then
    echo "fetch-ml100k: $DATA_DIR already holds valid ml-100k.inter, ml-100k.item and ml-100k.user"
    exit 0
fi

mkdir -p "$DATA_DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "fetch-ml100k: downloading $WHEEL_SPEC wheel (no install) ..."
python3 -m pip download --quiet --no-deps "$WHEEL_SPEC" -d "$TMP" >&2
WHEEL="$(ls "$TMP"/recbole-1.2.1-*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$WHEEL" ]; then
    echo "fetch-ml100k: error: pip did not produce a recbole-1.2.1 wheel in $TMP" >&2
    exit 1
fi

python3 - "$WHEEL" "$TMP/extract" "$MEMBER_DIR" <<'EOF'
import sys, zipfile, os
wheel, dest, member_dir = sys.argv[1:4]
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for name in ("ml-100k.inter", "ml-100k.item", "ml-100k.user"):
        member = f"{member_dir}/{name}"
        try:
            data = z.read(member)
        except KeyError:
            sys.exit(f"fetch-ml100k: error: {member} not found in {wheel}")
        with open(os.path.join(dest, name), "wb") as f:
            f.write(data)
EOF

status=0
for pair in "ml-100k.inter:$INTER_SHA" "ml-100k.item:$ITEM_SHA" "ml-100k.user:$USER_SHA"; do
    name="${pair%%:*}"
    want="${pair#*:}"
    got="$(sha256_of "$TMP/extract/$name")"
    if [ "$got" != "$want" ]; then
        echo "fetch-ml100k: error: sha256 mismatch for $name: got $got, expected $want" >&2
        status=1
    fi
done
if [ "$status" -ne 0 ]; then
    exit 1
fi

# Move into place only after all three files verified (atomic per file).
for name in ml-100k.inter ml-100k.item ml-100k.user; do
    cp "$TMP/extract/$name" "$DATA_DIR/.$name.tmp"
    mv "$DATA_DIR/.$name.tmp" "$DATA_DIR/$name"
done
echo "fetch-ml100k: wrote $DATA_DIR/ml-100k.inter, ml-100k.item and ml-100k.user (sha256 verified)"
