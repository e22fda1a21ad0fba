#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine (run as root): system packages, a venv, the package.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# chromium + fonts: the HTML report's test renders the page in a real headless browser.
debs=(gcc make libc6-dev gdb elfutils zstd libjemalloc2 libtcmalloc-minimal4 libmimalloc2.0 fiu-utils python3-venv
      chromium fonts-dejavu-core)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
    exit 2
  fi
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
# Reinstall only when the project metadata changed.
stamp=.venv/.harness-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
  touch "$stamp"
fi
