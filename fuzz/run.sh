#!/usr/bin/env bash
# Builds every fuzz target (libFuzzer + AddressSanitizer) and runs each against its committed corpus:
# first every input of fuzz/corpus/TARGET, then SECONDS of fuzzing from there. Fails on the first
# crash, panic, hang (-timeout), or memory blow-up (-rss_limit_mb), leaving the input that caused it in
# fuzz/artifacts/TARGET/. The committed corpus is only read: what a run finds goes to a temporary
# directory (keep it with `cargo fuzz run`, see README.md, "Fuzzing").
#
#   fuzz/run.sh                 # every target, 15 s each (what CI runs)
#   fuzz/run.sh 600 tar_layer   # one target, 10 minutes
#
# The machine's one toolchain is stable: cargo-fuzz asks rustc for -Zsanitizer=address, a nightly
# flag, which stable rustc accepts with RUSTC_BOOTSTRAP=1 (stable ships the sanitizer runtimes).
# That variable is set here, for the fuzz build only.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

seconds=${1:-15}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(sed -n 's/^name = "\([a-z_]*\)"$/\1/p' Cargo.toml | grep -v '^vmm-fuzz$')

step() { echo "fuzz/run.sh: $*" >&2; }

./install-cargo-fuzz.sh
export RUSTC_BOOTSTRAP=1
# Built where the next run finds it again (CI starts from a fresh clone each time): the crates.io
# dependencies, most of a clean build's 3 minutes, are then built once per machine.
cache=${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/fuzz-target}
step "building ${#targets[@]} targets"
# From fuzz/, so that fuzz/.cargo/config.toml applies (guest-init stand-in).
if [ $# -eq 0 ]; then
  nice cargo fuzz build >&2
else
  for t in "${targets[@]}"; do nice cargo fuzz build "$t" >&2; done
fi

bin=$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release
new=$(mktemp -d)
trap 'rm -rf "$new"' EXIT
failed=()
for t in "${targets[@]}"; do
  # a target whose corpus is not committed yet starts from nothing
  mkdir -p "artifacts/$t" "$new/$t" "corpus/$t"
  log="$new/$t.log"
  start=$SECONDS
  # -max_total_time counts from the start, the corpus included (well under a second for each).
  if nice "$bin/$t" "$new/$t" "corpus/$t" -max_total_time="$seconds" \
      -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
      -artifact_prefix="artifacts/$t/" >"$log" 2>&1 &&
     grep -q $'^#[0-9]*\tDONE' "$log"; then
    line=$(grep $'^#[0-9]*\tDONE' "$log" | tail -1 | tr '\t' ' ')
    inited=$(grep -m1 "INITED" "$log" | sed 's/.*\(cov: [0-9]*\) \(ft: [0-9]*\).*/\1 \2/')
    step "$t: corpus $(ls "corpus/$t" | wc -l) inputs, after them: $inited; after fuzzing: ${line#*DONE } ($((SECONDS - start)) s)"
  else
    step "$t: FAILED, see below; the input is in fuzz/artifacts/$t/"
    grep -E "panicked|ERROR|SUMMARY|Test unit written|Base64" "$log" | head -20 >&2 || tail -40 "$log" >&2
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  step "failed: ${failed[*]}"
  exit 1
fi
step "${#targets[@]} targets passed"
