#!/usr/bin/env bash
# Create .venv with the library, its CLI and everything the tests need.
# TORCH_SPEC picks the torch build: the default pins the CPU build used by CI;
# for a GPU use e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124".
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first and alone: the library's own "torch>=2.0" is then satisfied and pulls no other build.
python -m pip install --quiet $TORCH_SPEC
python -m pip install --quiet -e ".[test]"
# Debian packages some tests use; as root (CI) the missing ones are installed with apt-get; anywhere
# else, or if that fails, those tests skip and say why:
#  dicom3tools: dciodvfy validates the DICOM files the tests write;
#  openigtlink-examples, libopenigtlink-dev, g++: the reference OpenIGTLink client and server that
#  Testing/test_stream_reference.py builds to feed and read the live relay.
apt_missing=()
command -v dciodvfy >/dev/null 2>&1 || apt_missing+=(dicom3tools)
[ -f /usr/share/doc/openigtlink-examples/examples/Imager/ImagerClient.cxx ] || apt_missing+=(openigtlink-examples)
[ -f /usr/include/openigtlink/igtlImageMessage.h ] || apt_missing+=(libopenigtlink-dev)
command -v g++ >/dev/null 2>&1 || apt_missing+=(g++)
if [ ${#apt_missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq "${apt_missing[@]}"; } >/dev/null 2>&1; then
    for pkg in "${apt_missing[@]}"; do      # one unavailable package must not keep out the others
      apt-get install -y -qq "$pkg" >/dev/null 2>&1 \
        || echo "note: could not install $pkg with apt-get; the tests that need it will skip" >&2
    done
  fi
fi
