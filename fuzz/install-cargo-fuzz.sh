#!/usr/bin/env bash
# Installs cargo-fuzz from crates.io (with the versions of its own lock file) unless this version is
# already there: about a minute and a half of building on a fresh machine, one `cargo fuzz --version`
# (a few milliseconds) afterwards. libFuzzer itself comes with the libfuzzer-sys crate and is compiled
# by the fuzz build (it needs a C++ compiler: g++).
set -euo pipefail
version=0.13.2
if [ "$(cargo fuzz --version 2>/dev/null)" = "cargo-fuzz $version" ]; then
  exit 0
fi
echo "install-cargo-fuzz.sh: installing cargo-fuzz $version" >&2
# two CI runs on a fresh machine must not both build it into ~/.cargo/bin at once
if { exec 9>/var/lock/vmm-install-cargo-fuzz.lock; } 2>/dev/null; then flock 9; fi
if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $version" ]; then
  nice cargo install --locked --version "$version" cargo-fuzz >&2
fi
