#!/usr/bin/env bash
# Set up (idempotent) and run the New Year's Eve demo scenario.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/harness run scenarios/nye-spike.yaml "$@"
