#!/usr/bin/env bash
# Makes an ext4 image of a directory tree, without root privileges and without mounting anything.
#
#   rootfs/mkimage.sh SRC_DIR OUT.ext4 [SIZE_MB]
#
# Without SIZE_MB the image is the tree's size plus a margin for ext4's own metadata and some free space,
# rounded up to whole MiB. The image's root directory is owned by 0:0; every other file keeps the owner
# and mode it has in SRC_DIR (build the tree as root for root-owned files). The image is written beside
# OUT and renamed over it only when complete, so OUT is never half-written. Prints nothing on success; on
# failure one line on stderr and exit status 1 (2 for bad arguments).
set -euo pipefail

die() { echo "mkimage: $*" >&2; exit 1; }

usage() { echo "usage: $0 SRC_DIR OUT.ext4 [SIZE_MB]" >&2; exit 2; }

# Prints the image size in MiB that fits the tree in $1 of $2 entries: its disk usage and inodes, plus
# ext4's overhead.
fitting_size_mb() {
  local kib entries=$2
  kib=$(du -s --block-size=1K "$1" | cut -f1)
  # 25% free on top of the data and a 256-byte inode per entry; 16 MiB covers the journal, the group
  # descriptors and bitmaps of a small file system.
  echo $(( (kib * 5 / 4 + entries / 4 + 16 * 1024 + 1023) / 1024 ))
}

# the partial image and mkfs's messages, removed however the script ends
tmp=""
log=""
trap 'rm -f "$tmp" "$log"' EXIT

main() {
  if [ $# -lt 2 ] || [ $# -gt 3 ]; then usage; fi
  local src=$1 out=$2 size_mb=${3:-} entries
  [ -d "$src" ] || die "$src is not a directory"
  command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 is missing (install e2fsprogs, or run tests/testhost/install-deps.sh rootfs)"
  entries=$(find "$src" | wc -l)
  if [ -n "$size_mb" ]; then
    [[ "$size_mb" =~ ^[1-9][0-9]*$ ]] || die "SIZE_MB must be a whole number of MiB, got '$size_mb'"
  else
    size_mb=$(fitting_size_mb "$src" "$entries")
  fi

  mkdir -p "$(dirname "$out")"
  tmp=$(mktemp "$out.tmp.XXXXXX")
  log=$(mktemp)
  truncate -s "${size_mb}M" "$tmp"
  # 4 KiB blocks even for small images (mke2fs would pick 1 KiB below 512 MiB); enough inodes for every
  # entry with room for more whatever the size
  if ! mkfs.ext4 -q -F -b 4096 -N $(( entries + entries / 4 + 1024 )) -d "$src" -E root_owner=0:0 \
       "$tmp" >"$log" 2>&1; then
    # its last own complaint says most; otherwise all it said, on one line
    die "mkfs.ext4 could not put $src into a ${size_mb} MiB image: $(grep '^mkfs.ext4: ' "$log" | tail -n 1 \
      | sed 's/^mkfs.ext4: //' | grep . || grep . "$log" | tr '\n' ' ') (about $(fitting_size_mb "$src" "$entries") MiB fits)"
  fi
  # mktemp made it private; an image is as readable as any other build output
  chmod 0644 "$tmp"
  mv -f "$tmp" "$out"
  tmp=""
}

main "$@"
