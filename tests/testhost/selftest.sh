#!/usr/bin/env bash
# Proves that tests/testhost/run works and that /dev/kvm is usable where it runs commands: inside the
# emulated KVM test host on a PVM machine (VMM_TESTHOST=auto) or here on a VT-x/AMD-V host.
#
#   tests/testhost/selftest.sh
#
# 1. One run of a script that checks its arguments (spaces, quotes, globs survive), working directory,
#    environment (--env) and separate stdout/stderr, then boots our guest kernel with QEMU on KVM there
#    (`-accel kvm`, no root file system: the kernel panics, panic=-1 resets, reboot=k goes through port
#    0x64 where isa-debug-exit ends QEMU with 253).
# 2. One run that reads --stdin and exits 7: stdin and the exit status pass through.
# 3. VMM_TESTHOST=never: the same options run directly.
# Prints the test host's start-up time, the inner guest's boot time and the total; exits 0 when all passed.
# shellcheck disable=SC2016 # the single-quoted scripts and '$HOME' are meant for the command, unexpanded
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
run=$here/run
failures=0

say() { echo "selftest: $*" >&2; }
pass() { say "ok: $*"; }
fail_check() { say "FAILED: $*"; failures=$((failures + 1)); }

# Checks that "$2" (what was seen) equals "$3" (what was wanted), under the name $1.
expect_equal() {
  if [ "$2" = "$3" ]; then pass "$1"; else fail_check "$1: wanted $(printf %q "$3"), got $(printf %q "$2")"; fi
}

# Runs inside the test host, as bash -c with the test's arguments. Prints what the host side compares.
inner_script='
printf "arg:%s\n" "$@"
echo "cwd:$(pwd)"
echo "env:$SELFTEST_VALUE"
echo "to stderr" >&2
ls -l /dev/kvm >&2
[ -r /dev/kvm ] && [ -w /dev/kvm ] && echo "kvm:rw"
start=$(date +%s.%N)
console=$(qemu-system-x86_64 -accel kvm -M microvm,acpi=off -cpu host -smp 1 -m 256 \
  -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
  -device isa-debug-exit,iobase=0x64,iosize=1 \
  -kernel "$GUEST_KERNEL" -append "console=ttyS0 reboot=k panic=-1 quiet" </dev/null 2>&1)
status=$?
echo "guest:$status:$(awk -v a="$start" -v b="$(date +%s.%N)" "BEGIN { printf \"%.2f\", b - a }")"
case "$console" in
  *"Kernel panic"*) echo "guest:panicked" ;;
  *) printf "%s\n" "$console" | tail -n 20 >&2 ;;
esac
'

# Prints the value of "key:value" line $1 of output $2.
field() { printf '%s\n' "$2" | sed -n "s/^$1://p"; }

check_kvm_run() {
  local guest_kernel out err rc
  guest_kernel=$("$repo/kernel-config/build.sh" guest)
  err=$(mktemp)
  set +e
  out=$(cd "$repo" && VMM_TESTHOST_TIMINGS=1 "$run" --env SELFTEST_VALUE='x y' --env GUEST_KERNEL="$guest_kernel" \
        -- bash -c "$inner_script" inner 'a b' "it's" '$HOME' '*' 2>"$err")
  rc=$?
  set -e
  cat "$err" >&2
  expect_equal "exit status" "$rc" 0
  expect_equal "arguments" "$(field arg "$out" | tr '\n' '|')" "a b|it's|\$HOME|*|"
  expect_equal "working directory" "$(field cwd "$out")" "$repo"
  expect_equal "--env" "$(field env "$out")" "x y"
  expect_equal "stderr kept apart" "$(grep -c '^to stderr$' "$err")" 1
  expect_equal "/dev/kvm readable and writable" "$(field kvm "$out")" rw
  expect_equal "guest kernel boots on KVM and panics" "$(field guest "$out" | tail -n 1)" panicked
  expect_equal "QEMU on KVM ends through isa-debug-exit" "$(field guest "$out" | head -n 1 | cut -d: -f1)" 253
  timings=$(grep -o 'timings: .*' "$err" || true)
  guest_seconds=$(field guest "$out" | head -n 1 | cut -d: -f2)
  rm -f "$err"
}

check_stdin_and_status() {
  local out rc
  set +e
  out=$(printf 'hello\n' | "$run" --stdin -- sh -c 'read -r line; echo "$line"; exit 7')
  rc=$?
  set -e
  expect_equal "--stdin" "$out" hello
  expect_equal "exit status 7" "$rc" 7
}

check_direct() {
  local out rc
  set +e
  out=$(printf 'hi\n' | VMM_TESTHOST=never "$run" --stdin --env D=1 -- sh -c 'read -r l; echo "$l$D"; exit 5')
  rc=$?
  set -e
  expect_equal "direct: output" "$out" hi1
  expect_equal "direct: exit status" "$rc" 5
}

main() {
  local started=$EPOCHREALTIME
  timings="" guest_seconds=""
  check_kvm_run
  check_stdin_and_status
  check_direct
  say "${timings:-no timings (ran directly)}; inner guest (QEMU -accel kvm, boot to panic) ${guest_seconds:-?} s;" \
      "selftest total $(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"
  if [ "$failures" -ne 0 ]; then say "$failures checks failed"; exit 1; fi
  say "all passed"
}

main "$@"
