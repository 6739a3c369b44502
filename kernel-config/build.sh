#!/usr/bin/env bash
# Builds one of vmm's kernels from Debian's linux-source-6.1 and prints the path of the resulting vmlinux.
#
#   kernel-config/build.sh guest      # the guest kernel that vmm boots
#   kernel-config/build.sh testhost   # the emulated KVM test host's kernel (KVM + kvm_amd built in)
#
# The result is cached under $VMM_CACHE_DIR (default ${XDG_CACHE_HOME:-~/.cache}/vmm) keyed by the hash of
# everything that decides it: the fragment, the patches (patches/FLAVOUR/*.patch), the build recipe
# version, the kernel source package and the compiler. A second run with the same inputs prints the cached
# path at once. Progress goes to stderr; stdout carries only the path.
set -euo pipefail

flavour=${1:-}
case "$flavour" in
  guest|testhost) ;;
  *) echo "usage: $0 guest|testhost" >&2; exit 2 ;;
esac

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}
src_tar=/usr/src/linux-source-6.1.tar.xz
fragment=$here/$flavour.fragment
say() { echo "kernel-config: $*" >&2; }

install_build_deps() {
  local need=()
  [ -f "$src_tar" ] || need+=(linux-source-6.1)
  for tool in make gcc bc bison flex xz; do command -v "$tool" >/dev/null || need+=("$tool"); done
  [ -f /usr/include/libelf.h ] || need+=(libelf-dev)
  [ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
  [ ${#need[@]} -eq 0 ] && return
  # package names for the tools that are not packages of the same name
  local pkgs=()
  for n in "${need[@]}"; do
    case "$n" in gcc|make) pkgs+=(build-essential) ;; xz) pkgs+=(xz-utils) ;; *) pkgs+=("$n") ;; esac
  done
  say "installing ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q "${pkgs[@]}" >&2
}
install_build_deps

src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || stat -c %s "$src_tar")
# Bump when a change to this script changes the kernel it builds (not for cosmetic changes: a bump costs
# every machine a rebuild).
build_recipe=1
key=$( { cat "$fragment"; echo "recipe $build_recipe"; cat "$here"/patches/"$flavour"/*.patch 2>/dev/null || true
         echo "$src_version"; gcc --version | head -1; } | sha256sum | cut -c1-16)
out=$cache/kernels/$flavour-$key
mkdir -p "$cache/kernels"
# One build per flavour at a time: a second caller waits for the first and then finds it cached.
exec 9>"$cache/kernels/.lock-$flavour"
if ! flock -n 9; then
  say "another build of the $flavour kernel is running: waiting for it"
  flock 9
fi
if [ -f "$out/vmlinux" ]; then
  say "$flavour kernel cached ($out)"
  ln -sfn "$out/vmlinux" "$cache/$flavour-vmlinux"
  echo "$out/vmlinux"
  exit 0
fi

work=$(mktemp -d "$cache/kernels/.build-$flavour-XXXXXX")
trap 'rm -rf "$work"' EXIT
say "building the $flavour kernel (linux-source $src_version, key $key): 7-12 min on 2 cores"
say "unpacking $src_tar"
tar -C "$work" -xf "$src_tar"
tree=$(echo "$work"/linux-source-*)
for p in "$here"/patches/"$flavour"/*.patch; do
  [ -e "$p" ] || continue
  say "applying $(basename "$p")"
  patch -d "$tree" -p1 -s < "$p"
done

cd "$tree"
make -s ARCH=x86_64 tinyconfig >/dev/null
# merge_config.sh -m merges without resolving; olddefconfig then settles dependencies
KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null
make -s ARCH=x86_64 olddefconfig >/dev/null

# every option the fragment asks for must have survived dependency resolution
missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*)
      grep -qxF "$line" .config || { say "option did not stick: $line (got: $(grep -E "^(# )?${line%%=*}[= ]" .config || echo absent))"; missing=1; } ;;
    "# CONFIG_"*" is not set")
      opt=${line#\# }; opt=${opt%% *}
      if grep -qE "^$opt=" .config; then say "option did not stick: $line"; missing=1; fi ;;
  esac
done < "$fragment"
[ $missing -eq 0 ] || { say "fix $fragment"; exit 1; }

jobs=$(nproc)
say "make -j$jobs vmlinux"
start=$(date +%s)
# progress: one line the first time each directory is compiled, and a count every 500 objects
make ARCH=x86_64 -j"$jobs" vmlinux 2>&1 | awk '
  / (CC|AR|LD)  /{ n++; split($2, p, "/"); d = p[1]
    if (!(d in seen)) { seen[d] = 1; printf "kernel-config:   %5d objects, now in %s/\n", n, d > "/dev/stderr" }
    else if (n % 500 == 0) { printf "kernel-config:   %5d objects\n", n > "/dev/stderr" }
    next }
  /error|warning: /{ print > "/dev/stderr" }'
[ -f vmlinux ] || { say "the kernel build failed"; exit 1; }
say "built in $(( $(date +%s) - start )) s, vmlinux $(( $(stat -c %s vmlinux) / 1024 )) KiB"

staged=$work/out
mkdir -p "$staged"
cp vmlinux .config System.map "$staged/"
# rename into place last, so an interrupted build never leaves an entry that looks complete
mv "$staged" "$out"
ln -sfn "$out/vmlinux" "$cache/$flavour-vmlinux"
echo "$out/vmlinux"
