// Development check: opens the console in headless Chromium, reports console errors (CSP violations
// included) and the test hook's view, and saves screenshots of the three pages.
//   node dev/screenshot.mjs [URL] [OUTDIR]     (default http://127.0.0.1:4173/, /tmp/console-shots)
import { chromium } from 'playwright-core';
import { mkdir } from 'node:fs/promises';

const url = process.argv[2] || 'http://127.0.0.1:4173/';
const out = process.argv[3] || '/tmp/console-shots';
await mkdir(out, { recursive: true });
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 860 } });
page.on('console', (m) => {
  if (m.type() === 'error' || m.type() === 'warning') console.log(`console.${m.type()}: ${m.text()}`);
});
page.on('pageerror', (e) => console.log(`pageerror: ${e.message}`));
await page.goto(`${url}#/map`);
await page.waitForFunction(() => window.tapgraph && window.tapgraph.ready, null, { timeout: 30_000 });
await page.waitForTimeout(500);
const state = await page.evaluate(() => ({ generation: window.tapgraph.generation, counts: window.tapgraph.counts(), clusters: window.tapgraph.clusters(), visible: window.tapgraph.visible() }));
console.log(JSON.stringify(state));
await page.screenshot({ path: `${out}/map.png` });
await page.fill('#hub-degree', process.env.HUB || '8');
await page.waitForTimeout(300);
console.log('hub hidden:', JSON.stringify(await page.evaluate(() => ({ counts: window.tapgraph.counts(), clusters: window.tapgraph.clusters() }))));
await page.fill('#search', process.env.FIND || 'app-1');
await page.press('#search', 'Enter');
await page.waitForTimeout(600);
await page.screenshot({ path: `${out}/map-hub-hidden.png` });
await page.goto(`${url}#/fleet`);
await page.waitForSelector('#fleet-table tbody tr[data-agent]');
await page.waitForTimeout(300);
await page.screenshot({ path: `${out}/fleet.png`, fullPage: true });
await page.goto(`${url}#/policies`);
await page.waitForSelector('#rollout-table tbody tr');
await page.waitForTimeout(300);
await page.screenshot({ path: `${out}/policies.png`, fullPage: true });
await browser.close();
