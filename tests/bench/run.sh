#!/usr/bin/env bash
# Side-by-side boot benchmark: vmm against QEMU's microvm machine, same kernel, same image, same session.
#
#   tests/bench/run.sh [N] [--throughput] [--throughput-mib M] [--throughput-runs R] [--warmup W]
#                      [--mem MIB] [--kernel PATH] [--vmm PATH] [--vmm-b PATH] [--save FILE] [--timeout SECS]
#
# Builds what is missing (release vmm, the guest kernel, the busybox image, the bench image: busybox and
# /sbin/bench-init, which only runs `reboot -f`), then boots the emulated KVM test host ONCE (on a host with
# hardware KVM: runs directly) and runs there N rounds (default 5, or $VMM_BENCH_N), after W warm-up
# rounds (default 1) that are not counted, each interleaving:
#   vmm boot to init and reset   vmm --append init=/sbin/bench-init --rootfs BENCH_IMG (no --cmd)
#   vmm --cmd true               on the busybox image: guest-init, vsock, the command, teardown
#   QEMU microvm boot to init    same kernel, same bench image, same kernel command line, to the same reset
# It prints min/median/p90 per measurement (wall from exec to exit; vmm's phases from its --result JSON),
# vmm's VM exits to user space, and the ratios against QEMU. Nothing asserts on time.
#
#   --throughput         also measure stdout throughput: vmm --cmd 'head -c BYTES /dev/zero' | wc -c,
#                        and copy throughput: --copy-in of a BYTES workspace and --copy-out of it back
#   --throughput-mib M   bytes per throughput run in MiB (default 100)
#   --throughput-runs R  throughput runs (default 1)
#   --mem MIB            guest memory for every VM (default 1024, vmm's default)
#   --kernel PATH        guest kernel (default vmm's: ~/.cache/vmm/guest-vmlinux, built when missing)
#   --vmm PATH           measure this vmm binary instead of building target/x86_64-unknown-linux-gnu/release/vmm
#   --vmm-b PATH         also measure a second vmm binary (e.g. a build before a change) in every round, and
#                        print its ratio to the first: an A/B comparison under the same noise
#   --save FILE          keep the raw records (one JSON line per run, with vmm's whole --result) in FILE
#   --timeout SECS       give up on the test host after SECS (default: generous for N)
#
# In the test host absolute times mean little (nested SVM under QEMU TCG, ~10x slower per boot than
# hardware); the ratios against QEMU measured in the same session do.
set -euo pipefail
export LC_ALL=C
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

# vmm's boot-only kernel command line without --console, for QEMU: BASE_CMDLINE from vmm/src/builder.rs,
# then what builder.rs adds without a console and without --cmd. Read from the source so that the two stay
# the same; the copy below is the fallback if the source no longer parses.
fallback_base="reboot=k panic=-1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd i8042.nopnp cryptomgr.notests tsc=reliable no_timer_check random.trust_cpu=on percpu_alloc=page"
no_console="8250.nr_uarts=0 quiet"
boot_only="root=/dev/vda ro rootfstype=ext4"

base_cmdline() {
  local base
  base=$("$python" - "$repo/vmm/src/builder.rs" <<'PY' || true
import re, sys
src = open(sys.argv[1]).read()
m = re.search(r'const BASE_CMDLINE: &str\s*=\s*"((?:[^"\\]|\\.)*)"', src, re.S)
if m:
    # Rust: a backslash at the end of a line drops the newline and the next line's leading blanks
    print(re.sub(r'\\\n\s*', '', m.group(1)))
PY
)
  if [ -z "$base" ]; then
    say "WARNING: no BASE_CMDLINE in vmm/src/builder.rs: QEMU gets the copy in $0, which may differ from vmm's"
    base=$fallback_base
  fi
  echo "$base"
}

# Prints the path of the bench image: a static busybox and /sbin/bench-init, which resets the VM at once.
bench_image() {
  local name=bench-init.ext4 init hash file stage
  init=$'#!/bin/busybox sh\n# the whole init of the bench image: reset the VM (reboot=k: through the i8042)\n/bin/busybox reboot -f\n'
  hash=$( { printf '%s' "$init"; cat /bin/busybox "$repo/rootfs/mkimage.sh"; } | sha256sum | cut -c1-16)
  file=$(cached_current "$name" "$hash")
  if [ -z "$file" ]; then
    [ -x /bin/busybox ] || "$repo/tests/testhost/install-deps.sh" rootfs >&2 || die "no busybox-static"
    mkdir -p "$bench_cache"
    stage=$(mktemp -d "$bench_cache/.stage-XXXXXX")
    mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp}
    cp /bin/busybox "$stage/bin/busybox"
    printf '%s' "$init" > "$stage/sbin/bench-init"
    chmod 0755 "$stage/bin/busybox" "$stage/sbin/bench-init"
    "$repo/rootfs/mkimage.sh" "$stage" "$bench_cache/$name" || { rm -rf "$stage"; die "could not make the bench image"; }
    rm -rf "$stage"
    mark_current "$name" "$hash"
    file=$bench_cache/$name
  fi
  echo "$file"
}

# True when tests/testhost/run will boot the test host rather than run directly (its own rule).
in_test_host() {
  case "${VMM_TESTHOST:-auto}" in
    always) return 0 ;;
    never) return 1 ;;
    *) ! { [ -e /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; } ;;
  esac
}

main() {
  local n=${VMM_BENCH_N:-5} warmup=1 mem=1024 kernel="" timeout="" tput_mib=100 tput_runs=0 want_tput=0
  local vmm="" vmm_b=- save=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --throughput) want_tput=1 ;;
      --throughput-mib) tput_mib=${2:?--throughput-mib needs MiB}; shift ;;
      --throughput-runs) tput_runs=${2:?--throughput-runs needs a number}; want_tput=1; shift ;;
      --warmup) warmup=${2:?--warmup needs a number}; shift ;;
      --mem) mem=${2:?--mem needs MiB}; shift ;;
      --kernel) kernel=${2:?--kernel needs a path}; shift ;;
      --timeout) timeout=${2:?--timeout needs seconds}; shift ;;
      --vmm) vmm=${2:?--vmm needs a path}; shift ;;
      --vmm-b) vmm_b=${2:?--vmm-b needs a path}; shift ;;
      --save) save=${2:?--save needs a file}; shift ;;
      -h|--help) usage; exit 0 ;;
      [0-9]*) n=$1 ;;
      *) die "unknown argument $1 (see $0 --help)" ;;
    esac
    shift
  done
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number, got '$n'"
  [[ "$warmup" =~ ^[0-9]+$ ]] || die "--warmup wants a number, got '$warmup'"
  [[ "$tput_mib" =~ ^[1-9][0-9]*$ ]] || die "--throughput-mib wants a positive number, got '$tput_mib'"
  [[ "$mem" =~ ^[1-9][0-9]*$ ]] || die "--mem wants MiB, got '$mem'"
  if [ "$want_tput" -eq 1 ] && [ "$tput_runs" -eq 0 ]; then tput_runs=1; fi
  local per_round=150
  [ "$vmm_b" = - ] || per_round=250
  [ -n "$timeout" ] || timeout=$(( 300 + per_round * (n + warmup) + 600 * tput_runs ))

  "$repo/tests/testhost/install-deps.sh" testhost >&2 || die "missing packages (tests/testhost/install-deps.sh testhost)"
  if [ -n "$vmm" ]; then
    [ -x "$vmm" ] || die "--vmm $vmm is not an executable"
    vmm_bin=$(readlink -f "$vmm")
  else
    build_vmm
  fi
  if [ "$vmm_b" != - ]; then
    [ -x "$vmm_b" ] || die "--vmm-b $vmm_b is not an executable"
    vmm_b=$(readlink -f "$vmm_b")
  fi
  if in_test_host; then
    local f
    for f in "$vmm_bin" "$vmm_b" "$kernel"; do
      case "$f" in /tmp/*) die "$f is under /tmp, which the test host does not see (it has its own /tmp)" ;; esac
    done
  fi
  local kernel_path cmd_img bench_img cmdline where records rc=0
  kernel_path=$(guest_kernel "$kernel")
  cmd_img=$("$repo/rootfs/busybox-image.sh") || die "the busybox image does not build (rootfs/busybox-image.sh)"
  bench_img=$(bench_image)
  cmdline="$(base_cmdline) $no_console $boot_only init=/sbin/bench-init"
  where="directly on this host's hardware KVM"
  if in_test_host; then where="inside the emulated KVM test host (nested SVM under QEMU TCG; one L2 session)"; fi

  records=$(mktemp)
  # shellcheck disable=SC2064 # expand now
  trap "rm -f '$records'" EXIT
  say "kernel $kernel_path"
  say "QEMU's (and vmm's) kernel command line: $cmdline"
  say "vmm $vmm_bin$([ "$vmm_b" = - ] || echo "; vmm B $vmm_b")"
  say "$n rounds + $warmup warm-up, $where"
  "$repo/tests/testhost/run" --timeout "$timeout" -- "$bench_dir/boot-rounds.sh" \
    "$vmm_bin" "$vmm_b" "$kernel_path" "$bench_img" "$cmd_img" "$mem" "$n" "$warmup" "$tput_mib" "$tput_runs" "$cmdline" \
    > "$records" || rc=$?
  [ "$rc" -eq 0 ] || say "WARNING: the benchmark ended with status $rc; the figures below are what it printed before"
  if [ -n "$save" ]; then cp "$records" "$save" && say "raw records in $save"; fi
  echo
  "$python" "$bench_dir/report.py" boot "$records" \
    "vmm vs QEMU microvm $(date '+%F %T'), $where; $(nproc) host CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); --mem $mem; kernel $(basename "$(dirname "$kernel_path")")/$(basename "$kernel_path"):"
  return "$rc"
}

main "$@"
