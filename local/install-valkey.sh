#!/usr/bin/env bash
# Installs Valkey 8 from Debian bookworm-backports (root only). Idempotent.
# Valkey 8 is not in bookworm main; its dependencies (libjemalloc2, liblzf1) are,
# so the backports suite is added next to the machine's configured mirror.
set -euo pipefail
if command -v valkey-server >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "install-valkey: not root; install valkey-server from bookworm-backports yourself" >&2
  exit 1
fi
list=/etc/apt/sources.list.d/bookworm-backports.list
if [ ! -f "$list" ]; then
  uri=$(awk '$1=="URIs:"{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list)
  echo "deb $uri bookworm-backports main" > "$list"
fi
# A package manager busy after boot (unattended upgrades hold the dpkg lock) is waited for, up to
# 10 minutes, instead of failing with "Could not get lock".
wait_for_lock=(-o DPkg::Lock::Timeout=600)
apt-get "${wait_for_lock[@]}" update -qq
DEBIAN_FRONTEND=noninteractive apt-get "${wait_for_lock[@]}" install -y -qq --no-install-recommends \
  -t bookworm-backports valkey-server >/dev/null
valkey-server --version
