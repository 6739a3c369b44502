#!/usr/bin/env bash
# Installs the Debian packages that the emulated KVM test host (tests/testhost/run), the root file system
# image tools (rootfs/) and the device-fuzzing guest need, and nothing when they are all present (one
# dpkg-query, ~15 ms).
#
#   tests/testhost/install-deps.sh            # everything
#   tests/testhost/install-deps.sh testhost   # QEMU 10, its firmware, busybox-static, cpio, passt
#   tests/testhost/install-deps.sh rootfs     # busybox-static, e2fsprogs
#   tests/testhost/install-deps.sh fuzzguest  # gcc, binutils (tests/fuzz-guest, built by tests/device_fuzz.rs)
#
# QEMU 10 comes from bookworm-backports on Debian 12: QEMU 7.2 lets the nested guest's XSETBV through (see
# ENVIRONMENT.md), so the test host insists on >= 10. Installing needs root; without it this prints what to
# run and fails.
set -euo pipefail

say() { echo "install-deps: $*" >&2; }

# Package lists per use. seabios carries bios-microvm.bin, the firmware of QEMU's microvm machine; passt is
# vmm's user-mode network for --net (the test host runs this machine's binaries over 9p).
packages_for() {
  case "$1" in
    testhost) echo qemu-system-x86 seabios busybox-static cpio passt ;;
    rootfs) echo busybox-static e2fsprogs ;;
    fuzzguest) echo gcc binutils ;;
    *) say "unknown group '$1' (want testhost, rootfs or fuzzguest)"; exit 2 ;;
  esac
}

# Prints the packages of "$@" that are not installed, or (qemu-system-x86) older than QEMU 10.
missing_packages() {
  local pkg status version
  # one dpkg-query for all of them; unknown packages print nothing on stdout and are caught below
  declare -A installed=()
  while IFS=' ' read -r pkg status version; do
    [ "$status" = installed ] || continue
    if [ "$pkg" = qemu-system-x86 ] && dpkg --compare-versions "$version" lt 1:10; then continue; fi
    installed[$pkg]=1
  done < <(dpkg-query -W -f='${Package} ${db:Status-Status} ${Version}\n' "$@" 2>/dev/null || true)
  for pkg in "$@"; do
    [ -n "${installed[$pkg]:-}" ] || echo "$pkg"
  done
}

# On bookworm QEMU 10 lives in bookworm-backports: add that source once if no source names it yet.
enable_backports_if_bookworm() {
  local codename
  codename=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release 2>/dev/null || true)
  [ "$codename" = bookworm ] || return 0
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    say "adding the bookworm-backports source"
    echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/bookworm-backports.list
  fi
  echo "-t bookworm-backports"
}

install_packages() {
  local target
  if [ "$(id -u)" -ne 0 ]; then
    say "missing packages: $*; run as root: $0"
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  target=$(enable_backports_if_bookworm)
  say "installing $*"
  apt-get update -q >&2
  # QEMU and its firmware from backports (target set); the rest from the main suite
  local pkg backported=() plain=()
  for pkg in "$@"; do
    case "$pkg" in qemu-system-x86|seabios) backported+=("$pkg") ;; *) plain+=("$pkg") ;; esac
  done
  [ ${#plain[@]} -eq 0 ] || apt-get install -y -q "${plain[@]}" >&2
  # shellcheck disable=SC2086 # $target is empty or two words on purpose
  [ ${#backported[@]} -eq 0 ] || apt-get install -y -q $target "${backported[@]}" >&2
}

main() {
  local groups=("$@") wanted=() missing=()
  [ ${#groups[@]} -gt 0 ] || groups=(testhost rootfs fuzzguest)
  local group
  for group in "${groups[@]}"; do
    # packages_for runs in a subshell here: its exit for a bad group shows as an empty list
    read -ra pkgs <<< "$(packages_for "$group")"
    [ ${#pkgs[@]} -gt 0 ] || exit 2
    wanted+=("${pkgs[@]}")
  done
  mapfile -t missing < <(missing_packages "${wanted[@]}" | sort -u)
  [ ${#missing[@]} -eq 0 ] && return 0
  # two test runs on a fresh machine must not race each other through apt
  if { exec 9>/var/lock/vmm-install-deps.lock; } 2>/dev/null; then flock 9; fi
  mapfile -t missing < <(missing_packages "${wanted[@]}" | sort -u)
  [ ${#missing[@]} -eq 0 ] || install_packages "${missing[@]}"
}

main "$@"
