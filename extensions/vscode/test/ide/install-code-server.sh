#!/usr/bin/env bash
# Installs code-server (code-server/package-lock.json: 4.100.3, the newest for node 20) into a
# cache folder and prints the path of its `code-server` command. Idempotent: a finished install
# for the same lock file is reused (keyed by the lock's hash); concurrent runs wait on a lock.
#
# Needs: node 20 + npm, gcc/make/python3 (its native modules build from source), Debian
# libkrb5-dev (kerberos). Nothing is downloaded from outside the npm registry: the ripgrep
# binary that @vscode/ripgrep's postinstall would fetch from elsewhere is taken from npm's
# @vscode/ripgrep-linux-x64 and put where that postinstall looks first (its cache in $TMPDIR).
#
# Usage: install-code-server.sh [CACHE_DIR]   (default: $MIRRORD_IDE_CACHE or /tmp/mirrord-ide-cache)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cache="${1:-${MIRRORD_IDE_CACHE:-/tmp/mirrord-ide-cache}}"
# @vscode/ripgrep's version in code-server 4.100.3 (lib/vscode/npm-shrinkwrap.json) and the
# release file name its postinstall looks for; any rg that runs on linux-x64 serves
RIPGREP_PKG_VERSION=1.15.11
RIPGREP_ASSET=ripgrep-v13.0.0-10-x86_64-unknown-linux-musl.tar.gz
RIPGREP_NPM=@vscode/ripgrep-linux-x64@1.18.0

mkdir -p "$cache"
key="$(sha256sum "$here/code-server/package-lock.json" | cut -c1-16)"
dest="$cache/code-server-$key"
bin="$dest/node_modules/.bin/code-server"

exec 9>"$cache/.install.lock"
flock -w 900 9 || { echo "install-code-server: another install holds $cache/.install.lock for 15 min" >&2; exit 1; }

if [ -x "$bin" ] && [ -f "$dest/.complete" ]; then
  echo "$bin"
  exit 0
fi

work="$(mktemp -d "$cache/.work-XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/tmp" "$work/install"

# ripgrep from npm, where @vscode/ripgrep's postinstall finds it without downloading
(cd "$work" && npm pack --silent "$RIPGREP_NPM" >/dev/null)
tar -xzf "$work"/vscode-ripgrep-linux-x64-*.tgz -C "$work" package/bin/rg
mkdir -p "$work/tmp/vscode-ripgrep-cache-$RIPGREP_PKG_VERSION"
tar -czf "$work/tmp/vscode-ripgrep-cache-$RIPGREP_PKG_VERSION/$RIPGREP_ASSET" -C "$work/package/bin" rg

cp "$here/code-server/package.json" "$here/code-server/package-lock.json" "$work/install/"
(
  cd "$work/install"
  # yes=true: the machine's npmrc says yes=false, which cancels node-pty's build;
  # nodedir: headers for the native modules come from the installed node
  export TMPDIR="$work/tmp" npm_config_yes=true npm_config_nodedir="${npm_config_nodedir:-/usr}"
  npm ci --unsafe-perm --no-audit --no-fund --loglevel=error >&2
)
test -x "$work/install/node_modules/.bin/code-server" || { echo "install-code-server: no code-server after npm ci" >&2; exit 1; }
test -x "$work/install/node_modules/code-server/lib/vscode/node_modules/@vscode/ripgrep/bin/rg" \
  || { echo "install-code-server: code-server's postinstall did not run (no rg)" >&2; exit 1; }
rm -rf "$dest"
mv "$work/install" "$dest"
touch "$dest/.complete"
echo "$bin"
