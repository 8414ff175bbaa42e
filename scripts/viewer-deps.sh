#!/usr/bin/env bash
# What the OHIF viewer tests (tests/viewer) need besides the Python packages: Debian's `chromium` (driven
# headless by the PyPI `playwright` package of the dev extras, which is never asked to download a browser)
# and the built OHIF viewer, the `dist/` folder that the npm package @ohif/app ships, unpacked into
# .cache/ohif/dist (git-ignored). Idempotent: does nothing when both are already there.
set -euo pipefail
cd "$(dirname "$0")/.."
OHIF_VERSION="3.13.2"
CACHE=".cache/ohif"
STAMP="$CACHE/dist/.radai-ohif-$OHIF_VERSION"

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -f "$STAMP" ] || command -v npm >/dev/null 2>&1 || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

if [ ! -f "$STAMP" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    # `npm pack` fetches the published tarball only (no dependency install): it already holds the built dist/.
    (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
    tar -xzf "$tmp"/ohif-app-"$OHIF_VERSION".tgz -C "$tmp"
    [ -f "$tmp/package/dist/index.html" ] || { echo "viewer-deps: @ohif/app has no dist/index.html" >&2; exit 1; }
    rm -rf "$CACHE/dist"
    mkdir -p "$CACHE"
    mv "$tmp/package/dist" "$CACHE/dist"
    touch "$STAMP"
fi
