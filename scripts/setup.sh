#!/bin/sh
# Installs what `npm start`, `npm test` and `npm run bench` need on a fresh Debian
# machine: node_modules (npm ci) and, for tests and benchmarks, the real NBD clients
# and peers. Idempotent and quiet when everything is already there.
set -e
cd "$(dirname "$0")/.."
purpose="${1:-start}"

if [ ! -d node_modules ] || [ ! -f dist/src/cli/main.js ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "dve setup: installing npm packages" >&2
  # npm ci when the lock file is complete; npm 11 sometimes writes lock files that
  # lack other platforms' optional packages (msgpackr-extract), which npm ci refuses.
  npm ci --no-audit --no-fund >&2 2>/dev/null || npm install --no-audit --no-fund >&2
fi

need_apt() {
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q 'install ok installed' || echo "$pkg"
  done
}

case "$purpose" in
  test|bench)
    missing=$(need_apt libnbd-bin python3-libnbd nbdfuse qemu-utils fio nbdkit nbd-server nbd-client fuse3 e2fsprogs util-linux)
    if [ -n "$missing" ]; then
      if [ "$(id -u)" != 0 ]; then
        echo "dve setup: missing Debian packages: $missing (run as root, or install them)" >&2
        exit 1
      fi
      echo "dve setup: installing Debian packages: $missing" >&2
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >&2
      # shellcheck disable=SC2086
      apt-get install -y -qq --no-install-recommends $missing >&2
    fi
    ;;
esac
[ -f src/storage/native/build/Release/dve_io.node ] || npm run build:native >&2
# Always rebuild the TypeScript so a checkout that moved on runs its own code.
npx tsc -p tsconfig.json >&2
