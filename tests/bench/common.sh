# shellcheck shell=bash
# Shared by tests/bench/run.sh and tests/bench/null-guest.sh (sourced, not run): where things are, and
# building what a benchmark needs when it is missing. Everything here prints progress to stderr only.

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$bench_dir/../.." && pwd)
cache=${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}
bench_cache=$cache/bench
vmm_bin=$repo/target/x86_64-unknown-linux-gnu/release/vmm
# python3 without pyenv's shims: they may not run inside the test host, and nothing third-party is needed
python=/usr/bin/python3
[ -x "$python" ] || python=python3

say() { echo "bench: $*" >&2; }
die() { say "$*"; exit 1; }

# Builds the release vmm (a no-op when it is up to date). If the tree does not build right now (someone is
# half-way through an edit) but a binary exists, says so and goes on with that binary.
build_vmm() {
  say "building vmm (cargo build --release -p vmm)"
  if (cd "$repo" && nice cargo build --quiet --release -p vmm); then
    return
  fi
  [ -x "$vmm_bin" ] || die "vmm does not build and there is no $vmm_bin from before"
  say "WARNING: vmm does not build now; measuring the existing $vmm_bin ($(date -r "$vmm_bin" '+%F %T'))"
}

# Prints the guest kernel: --kernel's, or vmm's default (~/.cache/vmm/guest-vmlinux), built when missing.
guest_kernel() {
  local default=$cache/guest-vmlinux
  if [ -n "${1:-}" ]; then
    [ -f "$1" ] || die "kernel $1 is not a file"
    echo "$1"
    return
  fi
  if [ ! -f "$default" ]; then
    say "building the guest kernel (kernel-config/build.sh guest; once, 5-12 min)"
    "$repo/kernel-config/build.sh" guest >/dev/null || die "the guest kernel does not build"
  fi
  readlink -f "$default"
}

# Prints the path of a file under the bench cache that is current for the hash $2, or nothing: a file
# built from inputs that hash to $2 carries that hash in FILE.stamp.
cached_current() {
  local file=$bench_cache/$1
  if [ -f "$file" ] && [ "$(cat "$file.stamp" 2>/dev/null)" = "$2" ]; then echo "$file"; fi
}

mark_current() { echo "$2" > "$bench_cache/$1.stamp"; }

# Prints the path of the null guest (tests/bench/null-guest/mkelf.py's output), made when missing or stale;
# with --spin, of the variant that never ends.
null_guest() {
  local gen=$bench_dir/null-guest/mkelf.py name=null-guest.elf hash file flags=()
  if [ "${1:-}" = --spin ]; then name=null-guest-spin.elf; flags=(--spin); fi
  hash=$(sha256sum < "$gen" | cut -c1-16)
  file=$(cached_current "$name" "$hash")
  if [ -z "$file" ]; then
    mkdir -p "$bench_cache"
    file=$bench_cache/$name
    "$python" "$gen" "${flags[@]}" "$file" || die "could not make the null guest"
    mark_current "$name" "$hash"
  fi
  echo "$file"
}

# Prints the path of a 1 MiB image of zeros: the null guest never reads it, vmm only checks its size.
zero_image() {
  local file=$bench_cache/zero-1m.img
  if [ ! -f "$file" ] || [ "$(stat -c %s "$file")" -ne 1048576 ]; then
    mkdir -p "$bench_cache"
    truncate -s 1M "$file.tmp" && mv -f "$file.tmp" "$file"
  fi
  echo "$file"
}
