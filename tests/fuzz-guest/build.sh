#!/bin/sh
# Builds the device-fuzzing guest: an ELF64 with a PVH entry that vmm boots with --kernel.
#
#   tests/fuzz-guest/build.sh OUT.elf
#
# Needs gcc and binutils (ld) only: the guest is freestanding C plus a few lines of assembly, no libc.
set -eu
out=${1:?usage: build.sh OUT.elf}
dir=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cc=${CC:-gcc}
# 64-bit code without SSE (the guest never enables it), a red zone or a stack protector; no builtin
# calls either, and no loop turned into a call to the memset that the loop implements.
cflags="-std=gnu11 -O2 -Wall -Wextra -Werror -ffreestanding -fno-builtin -fno-pic -fno-pie \
  -fno-stack-protector -fno-asynchronous-unwind-tables -fno-tree-loop-distribute-patterns \
  -mno-red-zone -mgeneral-regs-only -mcmodel=small"
# shellcheck disable=SC2086 # cflags is a list of words
"$cc" $cflags -c "$dir/fuzz.c" -o "$tmp/fuzz.o"
"$cc" -c "$dir/start.S" -o "$tmp/start.o"
# linked beside OUT and renamed over it: a run that starts meanwhile sees the old file or the new one
ld -nostdlib -static -z max-page-size=0x1000 -z noexecstack --no-warn-rwx-segments -T "$dir/guest.ld" \
  -o "$out.$$.tmp" "$tmp/start.o" "$tmp/fuzz.o"
mv -f "$out.$$.tmp" "$out"
