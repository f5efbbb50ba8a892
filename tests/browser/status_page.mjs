// The status page (SPEC §10) in real headless Chromium, driven by playwright-core.
//
//   node tests/browser/status_page.mjs --subscribe http://127.0.0.1:P --publish http://127.0.0.1:Q \
//        --path /x --instances ID,ID --screenshot target/status-page.png
//
// Run by tests/status_page.rs, which owns Redis, both servers and a publisher sending on PATH
// at a steady rate. On each server's /status the page must show that server as this instance,
// Redis up, PATH with a rate above zero (linked to the live page on the subscribe server
// only) and, in the fleet, every instance of --instances with its heartbeat's age. Behind a
// proxy serving the relay under /subscribe/ (as nginx/lightrelay-tls.conf) it must work the
// same. The last line is `PASS …` (exit 0) or the failure goes to stderr (exit 1); every wait
// is bounded, the whole run by TOTAL_MS.

import { launch, startProxy } from './chromium.mjs';
import { parseArgs } from 'node:util';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const TOTAL_MS = 90_000;
const WAIT_MS = 20_000;

const { values: opt } = parseArgs({
  options: {
    subscribe: { type: 'string' },
    publish: { type: 'string' },
    path: { type: 'string' },
    instances: { type: 'string', default: '' },
    screenshot: { type: 'string' },
    chromium: { type: 'string', default: process.env.LIGHTRELAY_CHROMIUM || '/usr/bin/chromium' },
  },
});
for (const name of ['subscribe', 'publish', 'path', 'screenshot']) {
  if (!opt[name]) {
    process.stderr.write(`status_page.mjs: --${name} is required\n`);
    process.exit(2);
  }
}
const instances = opt.instances.split(',').filter(Boolean);
let checks = 0;
function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
  checks += 1;
}
const step = (text) => process.stdout.write(`# ${text}\n`);


// What the page shows now: this instance, its state, PATH's row, the fleet's rows.
function shown(page, path) {
  return page.evaluate((path) => {
    const row = [...document.querySelectorAll('#channels tr')].find((tr) => tr.dataset.path === path);
    return {
      state: document.getElementById('state').textContent,
      id: document.getElementById('i-id').textContent,
      role: document.getElementById('i-role').textContent,
      redis: document.getElementById('redis-state').textContent,
      rate: row ? Number(row.querySelector('td.rate').textContent) : null,
      link: row?.querySelector('a')?.href ?? null,
      fleet: Object.fromEntries([...document.querySelectorAll('#fleet tr[data-instance]')].map((tr) =>
        [tr.dataset.instance, tr.querySelector('td.heartbeat').textContent])),
    };
  }, path);
}

// Wait until what the page shows passes `ok`; fail with the last thing it showed.
async function until(page, what, ok) {
  const deadline = Date.now() + WAIT_MS;
  let seen = null;
  while (Date.now() < deadline) {
    seen = await shown(page, opt.path);
    if (ok(seen)) return seen;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}; the page shows ${JSON.stringify(seen)}`);
}

async function server(context, url, role) {
  const page = await context.newPage();
  page.on('console', (m) => { if (m.type() === 'error') process.stderr.write(`[${role}] ${m.text()}\n`); });
  await page.goto(`${url}/status`);
  const id = (await (await fetch(`${url}/status.json`)).json()).instance.id;
  const seen = await until(page, `${role}: this instance, Redis up, ${opt.path} with a rate, the fleet`, (s) =>
    s.state === 'live' && s.id === id && s.rate > 0 && instances.every((i) => i in s.fleet));
  check(seen.role === role, `${role}: the role shown`);
  check(seen.redis === 'up', `${role}: Redis up`);
  for (const i of instances) check(/^\d+ s ago$/.test(seen.fleet[i]), `${role}: ${i}'s heartbeat age (${seen.fleet[i]})`);
  step(`${role}: ${opt.path} at ${seen.rate}/s; fleet ${JSON.stringify(seen.fleet)}`);
  return { page, seen };
}

async function main() {
  const profile = mkdtempSync(join(tmpdir(), 'lightrelay-chromium-'));
  let context = null;
  let proxy = null;
  try {
    step(`starting ${opt.chromium}`);
    context = await launch(opt.chromium, profile, WAIT_MS);
    const requests = [];
    context.on('request', (r) => requests.push(r.url()));

    step('the subscribe server\'s page');
    const subscribe = await server(context, opt.subscribe, 'subscribe');
    check(subscribe.seen.link === `${opt.subscribe}/?path=${encodeURIComponent(opt.path)}`,
      `the channel links to its live page (${subscribe.seen.link})`);
    await subscribe.page.screenshot({ path: opt.screenshot, fullPage: true });
    step(`screenshot in ${opt.screenshot}`);

    step('the publish server\'s page');
    const publish = await server(context, opt.publish, 'publish');
    check(publish.seen.link === null, 'no live page to link to on the publish server');

    step('behind a path prefix');
    proxy = await startProxy(opt.subscribe);
    const prefixed = await context.newPage();
    await prefixed.goto(`${proxy.url}/status`);
    await until(prefixed, 'the page behind /subscribe/', (s) => s.state === 'live' && s.rate !== null);
    check(requests.some((u) => u === `${proxy.url}/status.json`), 'status.json asked under the prefix');

    const origins = new Set([opt.subscribe, opt.publish, new URL(proxy.url).origin].map((u) => new URL(u).origin));
    const elsewhere = requests.filter((u) => !u.startsWith('data:') && !origins.has(new URL(u).origin));
    check(elsewhere.length === 0, `no request leaves the relay: ${elsewhere.join(' ')}`);
    process.stdout.write(`PASS status page: ${checks} checks\n`);
  } finally {
    proxy?.close();
    if (context) await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  }
}

const timer = setTimeout(() => {
  process.stderr.write(`status_page.mjs: gave up after ${TOTAL_MS} ms\n`);
  process.exit(1);
}, TOTAL_MS);
main().then(() => { clearTimeout(timer); process.exit(0); }, (e) => {
  process.stderr.write(`status_page.mjs: ${e.stack || e}\n`);
  process.exit(1);
});
