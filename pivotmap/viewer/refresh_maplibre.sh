#!/usr/bin/env bash
# Refresh the MapLibre GL JS files that the viewer ships (no CDN at run time) from the npm
# registry: `pivotmap/viewer/refresh_maplibre.sh [VERSION]` (default: the pinned one below).
# 5.x is the newest line with the UMD build (dist/maplibre-gl.js) a plain <script> loads;
# 6.x ships ES modules only.
set -euo pipefail
version="${1:-5.24.1}"
here="$(cd "$(dirname "$0")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "maplibre-gl@$version" >/dev/null && tar xzf "maplibre-gl-$version.tgz")
cp "$tmp/package/dist/maplibre-gl.js" "$tmp/package/dist/maplibre-gl.css" "$here/"
cp "$tmp/package/LICENSE.txt" "$here/maplibre-gl.LICENSE.txt"
echo "maplibre-gl $version -> $here"
