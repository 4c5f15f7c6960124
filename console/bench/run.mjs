// Runs the frame-rate benchmark page in headless Chromium (playwright-core, Debian's /usr/bin/chromium):
// every library once per repetition, in rotating order, each in a fresh browser, and prints a Markdown
// table of medians with every repetition's frame rate.
//   node bench/run.mjs [--reps 5] [--frames 120] [--nodes 2000] [--libs sigma,cytoscape,cytoscape-webgl]
import { chromium } from 'playwright-core';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const reps = Number(args.reps || 5);
const frames = Number(args.frames || 120);
const nodes = Number(args.nodes || 2000);
const libs = (args.libs || 'cytoscape,cytoscape-webgl,sigma').split(',');
const dist = fileURLToPath(new URL('./dist/', import.meta.url));
const ORIGIN = 'http://bench.invalid';
const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css' };

const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
// No GPU here: Chromium draws WebGL with SwiftShader (software), which the table's renderer column shows.

let browserVersion = '?';

async function once(lib) {
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: FLAGS });
  browserVersion = browser.version();
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
    await page.route(`${ORIGIN}/**`, async (route) => {
      const rel = new URL(route.request().url()).pathname.replace(/^\/+/, '') || 'index.html';
      const file = path.join(dist, rel);
      if (!file.startsWith(dist)) return route.fulfill({ status: 404 });
      try {
        route.fulfill({ body: await readFile(file), contentType: TYPES[path.extname(file)] || 'application/octet-stream' });
      } catch {
        route.fulfill({ status: 404 });
      }
    });
    await page.goto(`${ORIGIN}/index.html?lib=${lib}&frames=${frames}&n=${nodes}`);
    await page.waitForFunction(() => window.benchResult, null, { timeout: 600_000, polling: 500 });
    const info = await page.evaluate(() => {
      const gl = document.createElement('canvas').getContext('webgl2');
      const ext = gl && gl.getExtension('WEBGL_debug_renderer_info');
      return ext ? gl.getParameter(ext.UNMASKED_RENDERER_WEBGL) : 'no WebGL';
    });
    return { ...(await page.evaluate(() => window.benchResult)), gl: info };
  } finally {
    await browser.close();
  }
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

const results = Object.fromEntries(libs.map((l) => [l, []]));
for (let r = 0; r < reps; r++) {
  const order = libs.map((_, i) => libs[(i + r) % libs.length]);
  for (const lib of order) {
    const res = await once(lib);
    if (res.error) {
      console.error(`${lib}: ${res.error}`);
      process.exitCode = 1;
      continue;
    }
    console.error(`rep ${r + 1} ${lib}: ${res.fps.toFixed(1)} fps, p95 ${res.p95FrameMs.toFixed(1)} ms, render ${res.renderMs.toFixed(0)} ms, layout ${res.layoutMs.toFixed(0)} ms (${res.gl})`);
    results[lib].push(res);
  }
}

const first = Object.values(results).flat()[0];
console.log(`${first ? first.nodes : nodes} nodes, ${first ? first.edges : '?'} edges, ${frames} frames of pan and zoom, ${reps} repetitions; medians`);
console.log(`Chromium ${browserVersion}; WebGL renderer: ${first ? first.gl : '?'}`);
console.log('');
console.log('| library | frames per second | p95 frame time | first render | ForceAtlas2 layout + redraw | fps of each repetition |');
console.log('|---|---|---|---|---|---|');
for (const lib of libs) {
  const rs = results[lib];
  if (!rs.length) {
    console.log(`| ${lib} | failed | | | | |`);
    continue;
  }
  console.log(
    `| ${lib} | **${median(rs.map((r) => r.fps)).toFixed(1)}** | ${median(rs.map((r) => r.p95FrameMs)).toFixed(1)} ms | ${median(rs.map((r) => r.renderMs)).toFixed(0)} ms | ${median(rs.map((r) => r.layoutMs)).toFixed(0)} ms | ${rs.map((r) => r.fps.toFixed(1)).join(', ')} |`,
  );
}
