#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine (run as root): system packages, a venv, the package.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# chromium + fonts: the HTML report's test renders the page in a real headless browser.
# varnish, nginx-light, redis-server, memcached: real services the tests and shipped scenarios run (the
# harness starts each host itself; none may run as a system service, see below).
# libjemalloc-dev (libjemalloc_pic.a): the binding proof's tests build a server with jemalloc linked in statically.
# iproute2 (ip netns, veth, bridge): the cluster tests stand in for machines with network namespaces.
debs=(gcc make libc6-dev gdb elfutils zstd libjemalloc2 libjemalloc-dev libtcmalloc-minimal4 libmimalloc2.0
      fiu-utils python3-venv chromium fonts-dejavu-core varnish nginx-light redis-server memcached iproute2)
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
  # Installing a service package starts it as a system service unless policy-rc.d says no: say no for
  # the install only (a policy already in place is left as it is), and stop any that started anyway.
  policy=/usr/sbin/policy-rc.d
  made_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
  fi
  trap '[ -n "$made_policy" ] && rm -f "$policy"' EXIT
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  if [ -n "$made_policy" ]; then rm -f "$policy"; made_policy=; fi
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    for unit in varnish nginx redis-server memcached; do
      systemctl disable --now "$unit" >/dev/null 2>&1 || true
    done
  fi
fi

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
# Reinstall only when the project metadata changed.
stamp=.venv/.harness-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # cluster: the optional Dask dependency of --cluster, so its tests run here and on CI
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test,cluster]"
  touch "$stamp"
fi
