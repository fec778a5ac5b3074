#!/usr/bin/env bash
# Installs the Debian packages named as arguments that are not installed yet; does nothing
# (and needs no network or root) when they all are. Sourced or run by scripts/compare.sh and
# scripts/test.sh.
#
#   bash scripts/ensure-packages.sh g++ cmake ninja-build ...
set -euo pipefail

moet_ensure_packages() {
  local missing=()
  local pkg
  for pkg in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$pkg")
    fi
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    return 0
  fi

  echo "moet: installing missing packages: ${missing[*]}" >&2
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "moet: apt-get not found; install these packages by hand: ${missing[*]}" >&2
    return 1
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "moet: not root and sudo not found; install these packages by hand: ${missing[*]}" >&2
      return 1
    fi
    sudo=sudo
  fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${missing[@]}"
}

# Run directly: install the packages given on the command line.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  moet_ensure_packages "$@"
fi
