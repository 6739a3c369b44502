#!/usr/bin/env bash
# The null-guest benchmark: vmm's own cost on this machine's /dev/kvm, without a kernel.
#
#   tests/bench/null-guest.sh [N] [--testhost] [--no-qemu] [--mem MIB] [--warmup W] [--sample-ms MS]
#
# The null guest (tests/bench/null-guest/mkelf.py, built into ~/.cache/vmm/bench/) is an ELF with a PVH
# entry whose first instructions write 0xFE to port 0x64, the i8042 reset that ends a vmm VM (and, with
# isa-debug-exit on that port, QEMU). It runs here, directly (no test host; --allow-slow-host, as nothing
# of a standard kernel runs), N times (default 5, or $VMM_BENCH_N), interleaved with QEMU microvm booting
# the same file, plus one warm-up round that is not counted. It prints min/median/p90 of vmm's start
# (main) to first KVM_RUN, teardown and total (from its --result JSON), exec to vmm's start (a third run
# per round, through exec-stamp.py and --trace: vmm cannot see its own exec) and so exec to first
# KVM_RUN, the wall time of both from exec to exit,
# peak RSS of both (GNU time's %M, from wait4) and vmm's RSS beyond the guest pages it reports resident,
# next to issue 5's targets (exec to first KVM_RUN <= 2 ms median; RSS beyond guest pages <= 2 MiB).
#
# Peak RSS counts the shared file pages of the binary and its libraries (and, from wait4, whatever the
# process that forked it had resident: Linux carries that high-water mark across exec). So each round also
# boots a guest that never ends (mkelf.py --spin), reads the VMM's /proc/PID/status while it runs
# (after --sample-ms, default 300) and reports its private memory (RssAnon) beside the shared (RssFile).
#
#   --testhost   also run the same loop once inside the emulated KVM test host (tests/testhost/run)
#   --no-qemu    vmm only
#   --mem MIB    guest memory for both (default 1024, vmm's default)
#   --warmup W   uncounted rounds first (default 1)
#   --sample-ms MS  how long the spinning guest runs before its VMM's memory is read (default 300)
#
# Wall times include starting the wrapper (/usr/bin/time), the same for both; its own cost is measured
# each round and shown. Nothing asserts on time: this prints figures.
set -euo pipefail
export LC_ALL=C
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

# --- one run -------------------------------------------------------------------------------------------

work=""
have_time=0
sample_ms=300

# Runs CMD once and prints its record (see report.py). RESULT is vmm's --result file, or - for none.
#   run_one NAME ROUND RESULT CMD...
run_one() {
  local name=$1 round=$2 result=$3 rc=0 t0 t1 rss=null res=null out
  shift 3
  out=$work/$name
  rm -f "$out.rss" "$out.err"
  if [ "$result" != - ]; then rm -f "$result"; fi
  if [ "$have_time" -eq 1 ]; then
    t0=$EPOCHREALTIME
    /usr/bin/time -o "$out.rss" -f %M "$@" >/dev/null 2>"$out.err" </dev/null || rc=$?
    t1=$EPOCHREALTIME
    # GNU time puts "Command exited with non-zero status N" first when there was one
    rss=$(tail -n 1 "$out.rss")
    [[ "$rss" =~ ^[0-9]+$ ]] || rss=null
  else
    t0=$EPOCHREALTIME
    "$@" >/dev/null 2>"$out.err" </dev/null || rc=$?
    t1=$EPOCHREALTIME
  fi
  if [ "$result" != - ] && [ -s "$result" ]; then res=$(tr -d '\n' < "$result"); fi
  printf 'bench-record {"m":"%s","i":%d,"rc":%d,"wall_us":%d,"maxrss_kib":%s,"result":%s}\n' \
    "$name" "$round" "$rc" $(( ${t1/./} - ${t0/./} )) "$rss" "$res"
  if [ -s "$out.err" ] && [ "$name" != qemu-null ] || { [ "$name" = qemu-null ] && [ "$rc" -ne 253 ]; }; then
    say "$name (round $round, exit status $rc) said: $(tail -n 3 "$out.err" | tr '\n' ' ')"
  fi
}

# Starts CMD (a VMM running the spinning guest), reads its /proc/PID/status after $sample_ms ms, stops it
# and prints a record with those figures under "status" (kB, as the kernel writes them).
#   sample_memory NAME ROUND RESULT CMD...
sample_memory() {
  local name=$1 round=$2 result=$3 pid fields key value _ status=""
  shift 3
  "$@" >/dev/null 2>"$work/$name.err" </dev/null &
  pid=$!
  sleep "$(awk -v ms="$sample_ms" 'BEGIN { printf "%.3f", ms / 1000 }')"
  fields=$(grep -E '^(VmHWM|VmRSS|RssAnon|RssFile|RssShmem):' "/proc/$pid/status" 2>/dev/null || true)
  # SIGTERM: vmm tears the VM down as on any signal (and writes its result); QEMU quits
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  while read -r key value _; do
    [ -n "$key" ] || continue
    status+="${status:+,}\"${key%:}\":$value"
  done <<< "$fields"
  local res=null
  if [ "$result" != - ] && [ -s "$result" ]; then res=$(tr -d '\n' < "$result"); fi
  printf 'bench-record {"m":"%s","i":%d,"rc":0,"wall_us":0,"maxrss_kib":null,"status":{%s},"result":%s}\n' \
    "$name" "$round" "$status" "$res"
  [ -n "$status" ] || say "$name (round $round): no /proc/$pid/status to read: it ended early ($(tail -n 2 "$work/$name.err" | tr '\n' ' '))"
}

# Spawns vmm (VMM ARGS...) through exec-stamp.py, which stamps CLOCK_MONOTONIC just before the spawn, and
# prints a record with the stamp, vmm's start on the same clock and its setup (both from --trace).
#   exec_one ROUND VMM ARGS...
exec_one() {
  local round=$1 out rc=0
  shift
  out=$("$python" "$bench_dir/exec-stamp.py" "$work/exec.trace" "$@" 2>"$work/exec.err") || rc=$?
  [ -n "$out" ] || out=null
  printf 'bench-record {"m":"vmm-exec","i":%d,"rc":%d,"wall_us":0,"maxrss_kib":null,"result":null,"exec":%s}\n' \
    "$round" "$rc" "$out"
  [ "$rc" -eq 0 ] || say "vmm-exec (round $round, status $rc) said: $(tail -n 3 "$work/exec.err" | tr '\n' ' ')"
}

# The measurement loop, run here or inside the test host. Prints records on stdout, progress on stderr.
#   measure VMM NULL_ELF SPIN_ELF IMAGE MEM N WARMUP QEMU(0|1) SAMPLE_MS
measure() {
  local vmm=$1 elf=$2 spin=$3 image=$4 mem=$5 n=$6 warmup=$7 qemu=$8 round total
  sample_ms=$9
  work=$(mktemp -d)
  # shellcheck disable=SC2064 # expand now: work is local to this function
  trap "rm -rf '$work'" EXIT
  if [ -x /usr/bin/time ]; then
    have_time=1
  else
    say "no /usr/bin/time (apt-get install time): no peak RSS from outside vmm"
  fi
  total=$(( n + warmup ))
  for (( round = 1 - warmup; round <= n; round++ )); do
    say "round $(( round + warmup ))/$total$([ "$round" -le 0 ] && echo ' (warm-up)')"
    # rounds before 1 are warm-up: recorded as round 0
    local r=$(( round > 0 ? round : 0 ))
    run_one vmm-null "$r" "$work/vmm.json" \
      "$vmm" --kernel "$elf" --rootfs "$image" --mem "$mem" --allow-slow-host --result "$work/vmm.json"
    if [ "$qemu" -eq 1 ]; then
      run_one qemu-null "$r" - \
        qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host -smp 1 -m "$mem" \
        -nodefaults -no-user-config -display none -no-reboot -kernel "$elf" \
        -device isa-debug-exit,iobase=0x64,iosize=1
    fi
    exec_one "$r" "$vmm" --kernel "$elf" --rootfs "$image" --mem "$mem" --allow-slow-host
    rm -f "$work/spin.json"
    sample_memory vmm-spin "$r" "$work/spin.json" \
      "$vmm" --kernel "$spin" --rootfs "$image" --mem "$mem" --allow-slow-host --result "$work/spin.json"
    if [ "$qemu" -eq 1 ]; then
      sample_memory qemu-spin "$r" - \
        qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host -smp 1 -m "$mem" \
        -nodefaults -no-user-config -display none -no-reboot -kernel "$spin"
    fi
    if [ "$have_time" -eq 1 ]; then
      have_time=0
      # the wrapper's own cost, measured the way the runs above are (but without a wrapper round it)
      local t0 t1
      t0=$EPOCHREALTIME
      /usr/bin/time -o /dev/null -f %M true
      t1=$EPOCHREALTIME
      printf 'bench-record {"m":"wrapper","i":%d,"rc":0,"wall_us":%d,"maxrss_kib":null,"result":null}\n' \
        "$r" $(( ${t1/./} - ${t0/./} ))
      have_time=1
    fi
  done
}

# --- the command ---------------------------------------------------------------------------------------

main() {
  local n=${VMM_BENCH_N:-5} testhost=0 qemu=1 mem=1024 warmup=1 sample=300
  if [ "${1:-}" = --inner ]; then
    shift
    measure "$@"
    return
  fi
  while [ $# -gt 0 ]; do
    case "$1" in
      --testhost) testhost=1 ;;
      --no-qemu) qemu=0 ;;
      --mem) mem=${2:?--mem needs MiB}; shift ;;
      --warmup) warmup=${2:?--warmup needs a number}; shift ;;
      --sample-ms) sample=${2:?--sample-ms needs milliseconds}; shift ;;
      -h|--help) usage; exit 0 ;;
      [0-9]*) n=$1 ;;
      *) die "unknown argument $1 (see $0 --help)" ;;
    esac
    shift
  done
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number, got '$n'"
  [[ "$warmup" =~ ^[0-9]+$ ]] || die "--warmup wants a number, got '$warmup'"
  [[ "$sample" =~ ^[1-9][0-9]*$ ]] || die "--sample-ms wants milliseconds, got '$sample'"
  if [ "$qemu" -eq 1 ] && ! command -v qemu-system-x86_64 >/dev/null; then
    say "no qemu-system-x86_64 (tests/testhost/install-deps.sh testhost installs it): vmm only"
    qemu=0
  fi
  build_vmm
  local elf spin image records
  elf=$(null_guest)
  spin=$(null_guest --spin)
  image=$(zero_image)
  records=$(mktemp)
  # shellcheck disable=SC2064 # expand now
  trap "rm -f '$records'" EXIT

  say "null guest $elf; $n rounds here (this machine's /dev/kvm), + $warmup warm-up"
  measure "$vmm_bin" "$elf" "$spin" "$image" "$mem" "$n" "$warmup" "$qemu" "$sample" > "$records"
  echo
  "$python" "$bench_dir/report.py" null "$records" \
    "null guest on this machine's /dev/kvm ($(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)), --mem $mem:"

  if [ "$testhost" -eq 1 ]; then
    local rc=0
    say "the same inside the emulated KVM test host (boots it once: tens of seconds)"
    "$repo/tests/testhost/run" --timeout $(( 120 + 60 * (n + warmup) )) -- \
      "$bench_dir/null-guest.sh" --inner "$vmm_bin" "$elf" "$spin" "$image" "$mem" "$n" "$warmup" "$qemu" "$sample" \
      > "$records" || rc=$?
    [ "$rc" -eq 0 ] || say "WARNING: the test host run ended with status $rc; figures below are what it printed"
    echo
    "$python" "$bench_dir/report.py" null "$records" \
      "null guest inside the emulated KVM test host (nested SVM under QEMU TCG: absolute figures mean little), --mem $mem:"
  fi
}

main "$@"
