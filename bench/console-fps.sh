#!/usr/bin/env bash
# Web console: frame rate of the candidate graph libraries at 2,000 nodes (issue 10).
#
#   bench/console-fps.sh [--reps 5] [--frames 120] [--nodes 2000] [--libs cytoscape,cytoscape-webgl,sigma]
#
# Builds the benchmark page (console/bench/, not part of the shipped console), then draws the same
# synthetic data-centre graph (clusters, 5 hubs, external endpoints; 2 edges per node) with each library
# in headless Chromium (Debian's /usr/bin/chromium via playwright-core), animates pan and zoom for a
# fixed number of frames, and prints frames per second (requestAnimationFrame), the first render and a
# ForceAtlas2 layout with redraw. Every library runs in each repetition, in rotating order, in a fresh
# browser. Needs node/npm and chromium (apt-get install -y chromium).
set -euo pipefail
cd "$(dirname "$0")/../console"
[ -x /usr/bin/chromium ] || { echo "needs /usr/bin/chromium: apt-get install -y chromium" >&2; exit 1; }
[ -d node_modules ] || npm ci --no-audit --no-fund
npm run --silent bench:build
exec node bench/run.mjs "$@"
