#!/usr/bin/env bash
# Packs what bench/gpu_check.sh needs on the lent GPU machine into two ignored carry folders,
# each under the 64 MiB a `run` call may carry (tracked files travel too):
#   .gpu/a/  the first part of CIFAR-10 train.tar
#   .gpu/b/  the rest of train.tar, test.tar, the ResNet-56 file, the wheels the machine lacks,
#            and SHA256SUMS (of the whole files, checked after reassembly)
# Run here (it needs the network for the wheels, and ../shared or CIFD_SHARED):
#   bash bench/gpu_pack.sh
# Then: call 1 carries .gpu/a (runs `ls`), call 2 carries .gpu/b (runs bench/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${CIFD_SHARED:-$(cd .. && pwd)/shared}"
TRAIN="$SHARED/data/cifar10-jpeg/train.tar"
TEST="$SHARED/data/cifar10-jpeg/test.tar"
MODEL="$SHARED/models/cifar10-resnet56.th"
PART_A_BYTES=$((54 * 1024 * 1024))   # .gpu/a: first 54 MiB of train.tar
LIMIT=$((60 * 1024 * 1024))          # each folder: well under the 64 MiB carry limit
PY="${PYTHON_PACK:-python3}"

for f in "$TRAIN" "$TEST" "$MODEL"; do
  [[ -f "$f" ]] || { echo "missing $f (set CIFD_SHARED to the folder holding data/ and models/)" >&2; exit 1; }
done

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"

rm -rf .gpu/a .gpu/b
mkdir -p .gpu/a .gpu/b/whl

# Wheels the GPU machine lacks (versions from uv.lock; the rest of the stack is preinstalled).
WHEELS=(
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  webdataset==1.0.2 braceexpand==0.1.7
  dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 zict==3.0.0 tornado==6.6.1
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
mkdir -p .gpu/whl-cache
for w in "${WHEELS[@]}"; do
  name="${w%%==*}"; ver="${w#*==}"
  norm="$(echo "$name" | tr '-' '_')"
  if ! ls .gpu/whl-cache/"${norm}"-"${ver}"-*.whl >/dev/null 2>&1; then
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]}" -d .gpu/whl-cache "$w"
  fi
done
for w in "${WHEELS[@]}"; do
  name="${w%%==*}"; ver="${w#*==}"
  norm="$(echo "$name" | tr '-' '_')"
  cp .gpu/whl-cache/"${norm}"-"${ver}"-*.whl .gpu/b/whl/
done

head -c "$PART_A_BYTES" "$TRAIN" > .gpu/a/train.tar.part-a
tail -c +"$((PART_A_BYTES + 1))" "$TRAIN" > .gpu/b/train.tar.part-b
cp "$TEST" .gpu/b/test.tar
cp "$MODEL" .gpu/b/cifar10-resnet56.th
( cd "$(dirname "$TRAIN")" && sha256sum train.tar test.tar ) > .gpu/b/SHA256SUMS
( cd "$(dirname "$MODEL")" && sha256sum cifar10-resnet56.th ) >> .gpu/b/SHA256SUMS

size() { du -sb "$1" | cut -f1; }
# What travels besides the carry folder: tracked files and untracked files git does not ignore.
tracked=$(git ls-files -z --cached --others --exclude-standard |
  "$PY" -c 'import os, sys; print(sum(os.path.getsize(p) for p in sys.stdin.read().split("\0") if os.path.isfile(p)))')
a=$(size .gpu/a); b=$(size .gpu/b)
echo "tracked files: $((tracked / 1024)) KiB; .gpu/a: $((a / 1024)) KiB; .gpu/b: $((b / 1024)) KiB"
for d in a b; do
  s=$(size ".gpu/$d")
  if (( s + tracked > LIMIT )); then echo ".gpu/$d + tracked files exceed $((LIMIT >> 20)) MiB" >&2; exit 1; fi
done
ls -l .gpu/a .gpu/b .gpu/b/whl
