#!/usr/bin/env bash
# The experiments behind ../TRIPLE-FAULT.md: runs one configuration N times inside the emulated KVM test
# host and prints one `tf-record key=value ...` line per run on stdout (progress on stderr). Run it through
# the test host, e.g. with two test-host CPUs:
#
#   VMM_TESTHOST_SMP=2 tests/testhost/run --timeout 3000 -- \
#     tests/testhost/triple-fault/experiment.sh vmm-zero 5 1073741824
#
#   experiment.sh MODE RUNS [SIZE]
#
# MODE:
#   vmm-zero  vmm --cmd 'head -c SIZE /dev/zero' | wc -c            (SIZE bytes; default 1 GiB)
#   vmm-seq   vmm --cmd 'seq 1 SIZE' | sha256sum, checked against the same output made in the test host
#   vmm-boot  vmm --cmd true                                         (boot, vsock up, command, teardown)
#   fc-zero   Firecracker, same guest kernel and image plus vsend: `head -c SIZE /dev/zero | vsend 1234`
#             in the guest, fc-sink.py counting and hashing on Firecracker's vsock Unix socket
#   fc-seq    the same with `seq 1 SIZE`
#   fc-boot   Firecracker booting the image to `reboot -f`
#   cpuinfo   the guest's /proc/cpuinfo flags under vmm and under Firecracker (one run each)
#
# Environment:
#   TF_PIN=same|split    vmm only: every vmm thread on test-host CPU 0 (same), or the vCPU thread on CPU 1 and
#                        every other thread on CPU 0 (split); default: no pinning
#   TF_APPEND=ARGS       more guest kernel arguments (e.g. noxsave) for both VMMs
#   TF_RUN_TIMEOUT=SECS  hard limit of one run (default 600); a run past it counts as a hang
#   TF_VMM=PATH          the vmm binary (default: this checkout's release build)
#   TF_CONSOLE=1         vmm --console (the guest's kernel log to stderr) and Firecracker's console kept
#   TF_EXPECTED="BYTES SHA256"  the correct output, computed outside the test host (much faster there)
#
# Outcomes: ok (exit 0, every byte, right checksum), triple-fault (vmm: 125 naming a triple fault;
# Firecracker: a KVM shutdown exit in its log), hang (the run's time limit passed), wrong-output, or
# error (anything else; the last lines of stderr follow).
set -uo pipefail
export LC_ALL=C

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
cache=${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}
kernel=$(readlink -f "$cache/guest-vmlinux")
rootfs=$cache/rootfs/busybox.ext4
vmm=${TF_VMM:-$repo/target/x86_64-unknown-linux-gnu/release/vmm}
fc=$repo/../shared/peers/firecracker
[ -x "$fc" ] || fc=/work/shared/peers/firecracker
vsend=$repo/target/triple-fault/vsend
run_timeout=${TF_RUN_TIMEOUT:-600}
append=${TF_APPEND:-}
pin=${TF_PIN:-}

say() { echo "experiment: $*" >&2; }

mode=${1:?mode}
runs=${2:?runs}
size=${3:-1073741824}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

smp=$(nproc)
config="mode=$mode smp=$smp size=$size pin=${pin:-none} append=${append// /,}"

# Prints a record: RUN OUTCOME RC BYTES SECS DETAIL...
record() {
  local run=$1 outcome=$2 rc=$3 bytes=$4 secs=$5
  shift 5
  echo "tf-record $config run=$run outcome=$outcome rc=$rc bytes=$bytes secs=$secs $*"
}

# Seconds since $1 (an $EPOCHREALTIME), to the millisecond.
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'; }

# The stdout that a correct run produces, as "bytes sha256" (TF_EXPECTED gives it, made outside: hashing
# a GiB under the emulator takes minutes).
expected_output() {
  if [ -n "${TF_EXPECTED:-}" ]; then echo "$TF_EXPECTED"; return; fi
  case "$mode" in
    *-zero) echo "$size $(head -c "$size" /dev/zero | sha256sum | cut -d' ' -f1)" ;;
    *-seq) echo "$(seq 1 "$size" | wc -c) $(seq 1 "$size" | sha256sum | cut -d' ' -f1)" ;;
    *) echo "0 -" ;;
  esac
}

# The guest command of a streaming mode.
guest_command() {
  case "$mode" in
    *-zero) echo "head -c $size /dev/zero" ;;
    *-seq) echo "seq 1 $size" ;;
    *) echo true ;;
  esac
}

# Pins the threads of vmm process $1 as TF_PIN says, once its vCPU thread exists.
pin_threads() {
  local pid=$1 task comm _
  [ "$pin" = split ] || return 0
  for _ in $(seq 1 200); do
    for task in /proc/"$pid"/task/*; do
      comm=$(cat "$task/comm" 2>/dev/null) || continue
      if [ "$comm" = vcpu0 ]; then
        taskset -pc 1 "${task##*/}" >/dev/null && return 0
      fi
    done
    sleep 0.01
  done
  say "could not find vmm's vcpu0 thread to pin"
}

run_vmm() {
  local k=$1 t0 rc bytes sum secs outcome detail want_bytes want_sum cmd prefix=()
  read -r want_bytes want_sum <<<"$expected"
  cmd=$(guest_command)
  case "$pin" in same|split) prefix=(taskset -c 0) ;; esac
  local flags=(--kernel "$kernel" --rootfs "$rootfs" --timeout "$run_timeout" --result "$work/result.json")
  [ -z "$append" ] || flags+=(--append "$append")
  [ "${TF_CONSOLE:-0}" != 1 ] || flags+=(--console)
  rm -f "$work/result.json"
  t0=$EPOCHREALTIME
  # vmm in the background so that its threads can be pinned; its stdout is counted and hashed through
  # FIFOs (the test host has no /dev/fd for bash's process substitution)
  rm -f "$work/out" "$work/out2" "$work/count" "$work/sum"
  mkfifo "$work/out" "$work/out2"
  wc -c <"$work/out2" >"$work/count" &
  tee "$work/out2" <"$work/out" | sha256sum | cut -d' ' -f1 >"$work/sum" &
  "${prefix[@]}" "$vmm" "${flags[@]}" --cmd "$cmd" </dev/null 2>"$work/err" >"$work/out" &
  local pid=$!
  pin_threads "$pid"
  # the outer limit: vmm's own --timeout should end it first
  ( sleep $((run_timeout + 30)); kill -KILL "$pid" 2>/dev/null ) &
  local guard=$!
  wait "$pid"
  rc=$?
  kill "$guard" 2>/dev/null
  wait "$guard" 2>/dev/null
  # the counting processes end when vmm's stdout closes
  for _ in $(seq 1 100); do [ -s "$work/sum" ] && [ -s "$work/count" ] && break; sleep 0.05; done
  secs=$(since "$t0")
  bytes=$(tr -d ' ' <"$work/count" 2>/dev/null)
  sum=$(cat "$work/sum" 2>/dev/null)
  detail=""
  if [ "$rc" -eq 0 ] && [ "$mode" = vmm-boot ]; then
    outcome=ok
  elif [ "$rc" -eq 0 ] && [ "$bytes" = "$want_bytes" ] && [ "$sum" = "$want_sum" ]; then
    outcome=ok
  elif [ "$rc" -eq 0 ]; then
    outcome=wrong-output
  elif [ "$rc" -eq 125 ] && grep -q 'triple-fault' "$work/err"; then
    outcome=triple-fault
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    outcome=hang
  else
    outcome=error
  fi
  if [ "$outcome" != ok ]; then
    detail="stderr=$(tail -n 3 "$work/err" | tr '\n ' '|_' | cut -c1-400)"
  fi
  local mibps=0
  if [ -n "$bytes" ] && [ "$bytes" -gt 0 ]; then
    mibps=$(awk -v b="$bytes" -v s="$secs" 'BEGIN { printf "%.1f", b / 1048576 / s }')
  fi
  record "$k" "$outcome" "$rc" "${bytes:-0}" "$secs" "mib_per_s=$mibps" "$detail"
  if [ "$outcome" != ok ] && [ -s "$work/result.json" ]; then
    echo "tf-result run=$k $(tr -d '\n' <"$work/result.json")"
  fi
  if [ "$outcome" != ok ] && [ "${TF_CONSOLE:-0}" = 1 ]; then
    tail -n 40 "$work/err" | sed "s/^/tf-console run=$k /"
  fi
}

# The Firecracker root image: the busybox test image plus /vsend and /stream.sh, made once per session in
# the test host's own /tmp.
fc_image() {
  local img=$work/fc-root.ext4
  if [ ! -f "$img" ]; then
    cp "$rootfs" "$img"
    # The guest's init: the load, then a reset (reboot=k: through the i8042, which ends Firecracker).
    cat >"$work/stream.sh" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t devtmpfs dev /dev
case "$TF_MODE" in
  fc-zero) head -c "$TF_SIZE" /dev/zero | /vsend 1234 ;;
  fc-seq) seq 1 "$TF_SIZE" | /vsend 1234 ;;
  cpuinfo) grep -m1 '^flags' /proc/cpuinfo; cat /proc/cmdline ;;
esac
echo "tf-guest-done $?"
reboot -f
EOF
    debugfs -w -R "write $vsend vsend" "$img" >/dev/null 2>&1
    debugfs -w -R "write $work/stream.sh stream.sh" "$img" >/dev/null 2>&1
    debugfs -w -R "sif vsend mode 0100755" "$img" >/dev/null 2>&1
    debugfs -w -R "sif stream.sh mode 0100755" "$img" >/dev/null 2>&1
  fi
  echo "$img"
}

run_fc() {
  local k=$1 t0 rc bytes sum secs outcome detail want_bytes want_sum img boot_args sink_pid
  read -r want_bytes want_sum <<<"$expected"
  img=$(fc_image)
  boot_args="console=ttyS0 reboot=k panic=-1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd"
  boot_args+=" i8042.nopnp tsc=reliable no_timer_check random.trust_cpu=on"
  boot_args+=" init=/stream.sh TF_MODE=$mode TF_SIZE=$size $append"
  rm -f "$work"/v.sock*
  cat >"$work/vm.json" <<EOF
{"boot-source": {"kernel_image_path": "$kernel", "boot_args": "$boot_args"},
 "drives": [{"drive_id": "root", "path_on_host": "$img", "is_root_device": true, "is_read_only": true}],
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 1024},
 "vsock": {"guest_cid": 3, "uds_path": "$work/v.sock"}}
EOF
  : >"$work/sink"
  sink_pid=""
  if [ "$mode" != fc-boot ] && [ "$mode" != cpuinfo ]; then
    /usr/bin/python3 "$here/fc-sink.py" "$work/v.sock_1234" "$want_bytes" >"$work/sink" &
    sink_pid=$!
    for _ in $(seq 1 100); do grep -q listening "$work/sink" && break; sleep 0.05; done
  fi
  : >"$work/fc.log"
  t0=$EPOCHREALTIME
  timeout -k 10 "$run_timeout" "$fc" --no-api --config-file "$work/vm.json" --level Info \
    --log-path "$work/fc.log" </dev/null >"$work/console" 2>"$work/err"
  rc=$?
  secs=$(since "$t0")
  if [ -n "$sink_pid" ]; then
    # the guest has reset: whatever reached the socket has been read; a sink still waiting got nothing
    ( sleep 15; kill "$sink_pid" 2>/dev/null ) &
    wait "$sink_pid" 2>/dev/null
  fi
  read -r _ bytes _ sum <<<"$(grep '^bytes' "$work/sink")"
  detail=""
  if [ "$mode" = cpuinfo ]; then
    grep -E '^(flags|console=)' "$work/console" | tr -d '\r' | sed 's/^/tf-cpuinfo vmm=firecracker /'
  fi
  if grep -qiE 'KVM_EXIT_SHUTDOWN|shutdown signal|Shutdown' "$work/fc.log" 2>/dev/null; then
    outcome=triple-fault
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    outcome=hang
  elif [ "$rc" -ne 0 ]; then
    outcome=error
  elif [ "$mode" = fc-boot ] || [ "$mode" = cpuinfo ]; then
    outcome=ok
  elif [ "${bytes:-}" = "$want_bytes" ] && [ "${sum:-}" = "$want_sum" ]; then
    outcome=ok
  else
    outcome=wrong-output
  fi
  if [ "$outcome" != ok ]; then
    detail="log=$(grep -v '^\s*$' "$work/fc.log" 2>/dev/null | tail -n 3 | tr '\n ' '|_' | cut -c1-400)"
    detail+=" console=$(tr -d '\r' <"$work/console" | tail -n 3 | tr '\n ' '|_' | cut -c1-300)"
  fi
  local mibps=0
  if [ -n "${bytes:-}" ] && [ "${bytes:-0}" -gt 0 ]; then
    mibps=$(awk -v b="$bytes" -v s="$secs" 'BEGIN { printf "%.1f", b / 1048576 / s }')
  fi
  record "$k" "$outcome" "$rc" "${bytes:-0}" "$secs" "mib_per_s=$mibps" "$detail"
  if [ "$outcome" != ok ]; then
    tail -n 40 "$work/console" | tr -d '\r' | sed "s/^/tf-console run=$k /"
  fi
}

say "$config, $runs runs, each at most $run_timeout s; kernel $kernel"
echo "tf-session $config runs=$runs kernel=$(basename "$kernel") qemu_cpus=$smp date=$(date -u +%FT%TZ)"
expected=$(expected_output)
for k in $(seq 1 "$runs"); do
  case "$mode" in
    vmm-*) run_vmm "$k" ;;
    fc-*) run_fc "$k" ;;
    cpuinfo)
      "$vmm" --cmd "grep -m1 '^flags' /proc/cpuinfo" ${append:+--append "$append"} </dev/null 2>/dev/null \
        | sed 's/^/tf-cpuinfo vmm=vmm /'
      run_fc "$k"
      ;;
    *) say "unknown mode $mode"; exit 2 ;;
  esac
done
