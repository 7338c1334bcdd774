#!/usr/bin/env bash
# Packs what a device session's pipeline check (jobs/device_pipeline.py) needs beyond the device's own
# torch, transformers, pyarrow, pandas, fsspec, pillow, sentencepiece and safetensors, into .device/
# (git-ignored; the session carries it: run(..., carry=[".device"])):
#   ray.tar.xz    Ray itself, by ../shared/device/make-ray-bundle (~32 MB)
#   extra.tar.xz  the packages Ray imports that such a box lacked: found by running the pipeline check in a
#                 Python 3.12 venv holding only the packages above plus ray.tar.xz (msgpack, protobuf, click,
#                 requests and its four, attrs: under 2 MB)
# jobs/device_session.sh unpacks both when they are there. Needs pip and a package index (this machine,
# not the device).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.device
maker=../shared/device/make-ray-bundle
[ -x "$maker" ] || { echo "device_bundle: $maker not found (it packs Ray)" >&2; exit 2; }
"$maker" "$dest"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$work/whl" msgpack protobuf click requests urllib3 idna certifi charset_normalizer attrs
mkdir -p "$work/site"
for w in "$work"/whl/*.whl; do (cd "$work/site" && unzip -q -o "$w"); done
tar -C "$work/site" -cf - . | xz -6 -T0 > "$dest/extra.tar.xz"
ls -la "$dest"
