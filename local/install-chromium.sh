#!/usr/bin/env bash
# Installs Debian's Chromium (root only), for the headless check of the `graph --html` page. Idempotent.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "install-chromium: not root; install Debian's chromium yourself" >&2
  exit 1
fi
# (-o DPkg::Lock::Timeout: a package manager busy after boot is waited for, not failed on)
install() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium >/dev/null; }
install || { apt-get -o DPkg::Lock::Timeout=600 update -qq && install; }
chromium --version
