#!/usr/bin/env bash
# Installs the Debian packages of real text that the data-pipeline tests and demo read (offline at run
# time): fortune cookies in English, German, Spanish, Italian, Russian and Chinese, and the Debian
# Reference in English and French (HTML). Idempotent: does nothing when all are installed; runs
# `apt-get update` only when a package cannot be found in the current package lists.
set -euo pipefail
PACKAGES=(fortunes fortunes-de fortunes-es fortunes-it fortunes-ru fortunes-zh debian-reference-en debian-reference-fr)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_test_corpora.sh: apt-get not found; install these Debian packages by hand: ${missing[*]}" >&2
  exit 1
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install_test_corpora.sh: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
install=("${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}")
echo "install_test_corpora.sh: installing ${missing[*]}"
if ! "${install[@]}" >/dev/null; then
  "${SUDO[@]}" apt-get update -q >/dev/null
  "${install[@]}" >/dev/null
fi
