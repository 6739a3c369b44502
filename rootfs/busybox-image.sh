#!/usr/bin/env bash
# Makes the small busybox root file system image that vmm's tests boot, and prints its path.
#
#   rootfs/busybox-image.sh [OUT]     # default: ${VMM_CACHE_DIR:-~/.cache/vmm}/rootfs/busybox.ext4
#
# Contents: a static busybox (Debian's busybox-static) as /bin/busybox with a symlink for every applet in
# /bin and at its usual place (/sbin, /usr/bin, /usr/sbin), so shebangs like #!/usr/bin/env sh work;
# /etc/passwd and /etc/group with root (0) and an unprivileged user builder (1000, home /home/builder) and
# nobody (65534); /etc/hostname, /etc/hosts; empty /proc /sys /dev /run /mnt /tmp (1777) /root.
# Cached: rebuilt only when this script, mkimage.sh or the busybox binary changed (a hash in OUT.stamp).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}
busybox=/bin/busybox

die() { echo "busybox-image: $*" >&2; exit 1; }

# The hash of everything that decides the image.
inputs_hash() {
  cat "${BASH_SOURCE[0]}" "$here/mkimage.sh" "$busybox" | sha256sum | cut -d' ' -f1
}

# Fills directory $1 with the image's tree.
populate_tree() {
  local root=$1 applet path
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,mnt,tmp,root,home/builder}
  chmod 1777 "$root/tmp"
  chmod 0700 "$root/root"
  cp "$busybox" "$root/bin/busybox"
  chmod 0755 "$root/bin/busybox"
  # every applet in /bin, where PATH finds it ...
  while IFS= read -r applet; do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
  done < <("$busybox" --list)
  # ... and at the path busybox itself names for it, where scripts write it out in full
  while IFS= read -r path; do
    # bin/ is done; linuxrc (an initrd's init, with no folder) has no place here
    case "$path" in
      bin/*) ;;
      */*) ln -sf /bin/busybox "$root/$path" ;;
    esac
  done < <("$busybox" --list-full)

  cat > "$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
builder:x:1000:1000:builder:/home/builder:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
  cat > "$root/etc/group" <<'EOF'
root:x:0:
builder:x:1000:
nogroup:x:65534:
EOF
  echo vmm > "$root/etc/hostname"
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' > "$root/etc/hosts"
  # the image records owners as they are here: only root can hand the builder its home
  if [ "$(id -u)" -eq 0 ]; then chown 1000:1000 "$root/home/builder"; fi
}

# the tree being built, removed however the script ends
stage=""
trap 'if [ -n "$stage" ]; then rm -rf "$stage"; fi' EXIT

main() {
  [ $# -le 1 ] || { echo "usage: $0 [OUT.ext4]" >&2; exit 2; }
  local out=${1:-$cache/rootfs/busybox.ext4} hash
  "$here/../tests/testhost/install-deps.sh" rootfs || die "missing packages (tests/testhost/install-deps.sh rootfs failed)"
  hash=$(inputs_hash)
  if [ -f "$out" ] && [ "$(cat "$out.stamp" 2>/dev/null)" = "$hash" ]; then
    echo "$out"
    return
  fi
  mkdir -p "$(dirname "$out")"
  # one builder at a time per image; the one that waited finds it built
  exec 9>"$out.lock"
  flock 9
  if ! [ -f "$out" ] || [ "$(cat "$out.stamp" 2>/dev/null)" != "$hash" ]; then
    stage=$(mktemp -d)
    populate_tree "$stage/root"
    "$here/mkimage.sh" "$stage/root" "$out" || exit 1
    echo "$hash" > "$out.stamp"
  fi
  echo "$out"
}

main "$@"
