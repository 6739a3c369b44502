#!/usr/bin/env bash
# The measuring half of tests/bench/run.sh, run once inside the emulated KVM test host (or directly, on a
# host with hardware KVM): all rounds in one session, each round interleaving
#   vmm-init   vmm booting the bench image's own init (/sbin/bench-init: `reboot -f`) to its reset
#   vmm-cmd    vmm --cmd true on the busybox image (guest-init, vsock, the command, teardown)
#   qemu-init  QEMU microvm booting the same kernel and bench image to the same reset
# then, when asked, vmm's throughput runs (stdout, and --copy-in/--copy-out of a workspace). Prints one `bench-record {json}` line per run on stdout
# (report.py reads them) and progress on stderr. Wall times are bash's $EPOCHREALTIME around the command:
# no wrapper process, nothing but the fork and exec.
#
#   boot-rounds.sh VMM VMM_B KERNEL BENCH_IMG CMD_IMG MEM_MIB N WARMUP TPUT_MIB TPUT_RUNS CMDLINE
#
# VMM_B is a second vmm binary measured the same way in each round (vmmb-init, vmmb-cmd), or - for none.
# CMDLINE is QEMU's -append: the line vmm gives the kernel in its boot-only mode (QEMU appends its own
# virtio_mmio.device= after it).
set -euo pipefail
export LC_ALL=C

say() { echo "bench: $*" >&2; }

[ $# -eq 11 ] || { say "usage: $0 VMM VMM_B KERNEL BENCH_IMG CMD_IMG MEM_MIB N WARMUP TPUT_MIB TPUT_RUNS CMDLINE"; exit 2; }
vmm=$1 vmm_b=$2 kernel=$3 bench_img=$4 cmd_img=$5 mem=$6 n=$7 warmup=$8 tput_mib=$9 tput_runs=${10} cmdline=${11}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Prints a record. RESULT is vmm's --result file or -; EXTRA more JSON members (",\"k\":v") or empty.
#   record NAME ROUND RC WALL_US RESULT EXTRA
record() {
  local res=null
  if [ "$5" != - ] && [ -s "$5" ]; then res=$(tr -d '\n' < "$5"); fi
  printf 'bench-record {"m":"%s","i":%d,"rc":%d,"wall_us":%d,"maxrss_kib":null,"result":%s%s}\n' \
    "$1" "$2" "$3" "$4" "$res" "$6"
}

# Says what a failed run printed.
complain() {
  say "$1 (round $2) ended with status $3: $(tail -n 5 "$work/err" | tr '\n' ' ')"
}

# Runs CMD with no stdin and stdout, stderr in $work/err; prints the record.
#   timed NAME ROUND EXPECTED_RC RESULT CMD...
timed() {
  local name=$1 round=$2 expect=$3 result=$4 rc=0 t0 t1
  shift 4
  if [ "$result" != - ]; then rm -f "$result"; fi
  t0=$EPOCHREALTIME
  "$@" </dev/null >/dev/null 2>"$work/err" || rc=$?
  t1=$EPOCHREALTIME
  record "$name" "$round" "$rc" $(( ${t1/./} - ${t0/./} )) "$result" ""
  [ "$rc" -eq "$expect" ] || complain "$name" "$round" "$rc"
}

# QEMU option values escape a comma by doubling it.
qemu_drive=${bench_img//,/,,}
qemu=(qemu-system-x86_64 -M "microvm,acpi=off" -accel kvm -cpu host -smp 1 -m "$mem"
      -nodefaults -no-user-config -nographic -no-reboot
      -kernel "$kernel" -append "$cmdline"
      -drive "id=root,file=$qemu_drive,format=raw,if=none,readonly=on" -device "virtio-blk-device,drive=root"
      -device "isa-debug-exit,iobase=0x64,iosize=1")

# The two vmm measurements of a round with one binary.
#   vmm_rounds PREFIX VMM ROUND
vmm_rounds() {
  timed "$1-init" "$3" 0 "$work/init.json" \
    "$2" --kernel "$kernel" --rootfs "$bench_img" --mem "$mem" --append init=/sbin/bench-init \
    --result "$work/init.json"
  timed "$1-cmd" "$3" 0 "$work/cmd.json" \
    "$2" --kernel "$kernel" --rootfs "$cmd_img" --mem "$mem" --cmd true --result "$work/cmd.json"
}

total=$(( n + warmup ))
for (( k = 1; k <= total; k++ )); do
  round=$(( k > warmup ? k - warmup : 0 ))
  say "round $k/$total$([ "$round" -eq 0 ] && echo ' (warm-up: not counted)')"
  vmm_rounds vmm "$vmm" "$round"
  # the guest's reset writes 0xFE to isa-debug-exit: QEMU exits (0xFE << 1 | 1) & 0xff = 253
  timed qemu-init "$round" 253 - "${qemu[@]}"
  if [ "$vmm_b" != - ]; then vmm_rounds vmmb "$vmm_b" "$round"; fi
done

bytes=$(( tput_mib * 1024 * 1024 ))
for (( k = 1; k <= tput_runs; k++ )); do
  say "throughput run $k/$tput_runs: $tput_mib MiB of stdout"
  rm -f "$work/tput.json"
  t0=$EPOCHREALTIME
  set +e
  "$vmm" --kernel "$kernel" --rootfs "$cmd_img" --mem "$mem" --cmd "head -c $bytes /dev/zero" \
    --result "$work/tput.json" </dev/null 2>"$work/err" | wc -c > "$work/count"
  rc=${PIPESTATUS[0]}
  set -e
  t1=$EPOCHREALTIME
  counted=$(cat "$work/count")
  record vmm-tput "$k" "$rc" $(( ${t1/./} - ${t0/./} )) "$work/tput.json" ",\"bytes\":${counted:-0}"
  [ "$rc" -eq 0 ] || complain vmm-tput "$k" "$rc"

  # the same number of bytes as a workspace: one big file and 64 small ones, copied in and back out
  say "throughput run $k/$tput_runs: $tput_mib MiB copied in and out"
  rm -rf "$work/ws" "$work/out" "$work/copy.json"
  mkdir -p "$work/ws/small"
  head -c $(( bytes - 64 * 16384 )) /dev/urandom > "$work/ws/big"
  for (( f = 0; f < 64; f++ )); do head -c 16384 /dev/urandom > "$work/ws/small/$f"; done
  t0=$EPOCHREALTIME
  set +e
  "$vmm" --kernel "$kernel" --rootfs "$cmd_img" --mem "$mem" --copy-in "$work/ws:/ws" \
    --copy-out "/ws:$work/out" --cmd true --result "$work/copy.json" </dev/null 2>"$work/err" >/dev/null
  rc=$?
  set -e
  t1=$EPOCHREALTIME
  same=false
  if diff -r "$work/ws" "$work/out/ws" >/dev/null 2>&1; then same=true; fi
  record vmm-copy "$k" "$rc" $(( ${t1/./} - ${t0/./} )) "$work/copy.json" ",\"bytes\":$bytes,\"same\":$same"
  [ "$rc" -eq 0 ] || complain vmm-copy "$k" "$rc"
done
