#!/usr/bin/env bash
# The README's test command: installs the test extras (torch/torchvision come from local disk) and
# Debian's Chromium for the browser test when it is missing, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[test]' -c scripts/constraints.txt
if ! command -v chromium >/dev/null 2>&1; then
  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null
fi
exec python3 -m pytest "$@"
