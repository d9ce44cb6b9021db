# Sourced by tools/run, tools/test and tools/bench: installs the Debian packages
# the project needs (only those missing) and builds into build/.
# Safe to source repeatedly; exits the caller on failure.

project_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

required_packages=(
  build-essential cmake pkg-config
  libfuse3-dev fuse3 libnbd-dev libasio-dev libcli11-dev doctest-dev
  nbdkit libnbd-bin qemu-utils fio python3 e2fsprogs util-linux procps
  gnutls-bin parted openssl python3-matplotlib
  qemu-system-common iproute2 nftables
)

ensure_packages() {
  local missing=() package
  for package in "${required_packages[@]}" "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "Installing missing packages: ${missing[*]}" >&2
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_fuse_device() {
  if [ ! -e /dev/fuse ]; then
    [ "$(id -u)" -eq 0 ] && modprobe fuse 2>/dev/null || true
  fi
  [ -e /dev/fuse ] || { echo "error: /dev/fuse is missing (load the fuse module)" >&2; exit 1; }
}

build_project() {
  local build_dir=${1:-$project_root/build}
  shift || true
  cmake -S "$project_root" -B "$build_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
  cmake --build "$build_dir" -j"$(nproc)"
}
