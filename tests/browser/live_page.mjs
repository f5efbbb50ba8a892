// The live page (SPEC §7) in real headless Chromium, driven by playwright-core.
//
//   node tests/browser/live_page.mjs --subscribe http://127.0.0.1:P --publish http://127.0.0.1:Q \
//        --screenshot target/live-page.png [--phone-screenshot target/live-page-phone.png]
//   node tests/browser/live_page.mjs --subscribe … --publish … --token T
//        (SPEC §8: the subscribe server runs --auth all and T may subscribe to PATH)
//   node tests/browser/live_page.mjs --subscribe … --publish … --history
//        (SPEC §9: both servers run --history: the latest value on open, resume after a restart)
//
// Run by tests/live_page.rs, which owns Redis and both servers. The two talk over this
// process's stdin/stdout: a line `@COMMAND ARG` asks the Rust side to do something (stop or
// start the subscribe server, wait for a Redis subscription) and this script waits for its
// `ok`. Lines starting with `#` are progress; the last line is `PASS …` (exit 0) or the failure
// goes to stderr (exit 1). Every wait is bounded; the whole run is bounded by TOTAL_MS.

import { launch as launchChromium, startProxy } from './chromium.mjs';
import { parseArgs } from 'node:util';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import readline from 'node:readline';

const TOTAL_MS = 150_000;
const WAIT_MS = 20_000;
const RECONNECT_WAIT_MS = 45_000; // back-off after a restart: 1 s, 2 s, 4 s, ... plus start-up
const PATH = '/live-page-test';

const { values: opt } = parseArgs({
  options: {
    subscribe: { type: 'string' },
    publish: { type: 'string' },
    screenshot: { type: 'string' },
    'phone-screenshot': { type: 'string' },
    token: { type: 'string' },
    history: { type: 'boolean', default: false },
    chromium: { type: 'string', default: process.env.LIGHTRELAY_CHROMIUM || '/usr/bin/chromium' },
  },
});
for (const name of opt.token || opt.history ? ['subscribe', 'publish'] : ['subscribe', 'publish', 'screenshot']) {
  if (!opt[name]) usage(`--${name} is required`);
}
const subscribeUrl = opt.subscribe.replace(/\/+$/, '');
const publishUrl = opt.publish.replace(/\/+$/, '');
const toWs = (u) => u.replace(/^http/, 'ws');

function usage(problem) {
  process.stderr.write(`live_page.mjs: ${problem}\n`);
  process.exit(2);
}

let checks = 0;
function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
  checks += 1;
}
const step = (text) => process.stdout.write(`# ${text}\n`);

// ---- talking to the Rust side ------------------------------------------------------------
const replies = [];
let replyWaiter = null;
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  if (replyWaiter) { const w = replyWaiter; replyWaiter = null; w(line); } else replies.push(line);
});
async function ask(command) {
  process.stdout.write(`@${command}\n`);
  const line = replies.length
    ? replies.shift()
    : await withTimeout(new Promise((resolve) => { replyWaiter = resolve; }), WAIT_MS * 2, `reply to @${command}`);
  if (line !== 'ok') throw new Error(`@${command} answered ${JSON.stringify(line)}`);
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), ms); });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}


// ---- publishing through the publish server -------------------------------------------------
async function post(body) {
  const response = await withTimeout(fetch(publishUrl + PATH, { method: 'POST', body }), WAIT_MS, 'POST');
  const text = await response.text();
  check(response.status === 200, `POST answers 200 (got ${response.status} ${text.trim()})`);
  return Number(text.trim());
}

// A real browser WebSocket to the publish server, with the lightrelay.ack subprotocol: resolves
// once every message was acknowledged, so each one is known to be PUBLISHed.
async function publishWs(page, messages, paceMs = 0) {
  return page.evaluate(async ({ url, messages, paceMs, waitMs }) => {
    const ws = new WebSocket(url, 'lightrelay.ack');
    ws.binaryType = 'arraybuffer';
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onclose = (e) => reject(new Error(`publish socket closed ${e.code} before opening`));
    });
    if (ws.protocol !== 'lightrelay.ack') throw new Error(`subprotocol ${ws.protocol}`);
    let acks = 0;
    const acked = new Promise((resolve, reject) => {
      ws.onmessage = () => { acks += 1; if (acks === messages.length) resolve(); };
      ws.onclose = (e) => reject(new Error(`publish socket closed ${e.code} after ${acks} acks`));
      setTimeout(() => reject(new Error(`${acks} of ${messages.length} acks`)), waitMs);
    });
    for (const m of messages) {
      ws.send(typeof m === 'string' ? m : new Uint8Array(m));
      if (paceMs) await new Promise((r) => setTimeout(r, paceMs));
    }
    await acked;
    ws.onclose = null;
    ws.close(1000);
    return acks;
  }, { url: toWs(publishUrl) + PATH, messages, paceMs, waitMs: WAIT_MS });
}

// ---- the page ----------------------------------------------------------------------------
const pageErrors = [];
function watchConsole(page, name) {
  page.on('pageerror', (e) => pageErrors.push(`${name}: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    // Chromium logs each refused reconnect attempt while the relay is down: expected.
    if (/WebSocket connection to .* failed/.test(m.text()) || /ERR_CONNECTION_REFUSED/.test(m.text())) return;
    // So is each 503 of /healthz while Redis is down (step 7).
    if (/status of 503/.test(m.text()) && /\/healthz$/.test(m.location()?.url ?? '')) return;
    pageErrors.push(`${name}: ${m.text()}`);
  });
}

const state = (page) => page.evaluate(() => window.lightrelay?.state);
async function waitState(page, wanted, ms = WAIT_MS) {
  try {
    await page.waitForFunction((s) => window.lightrelay?.state === s, wanted, { timeout: ms, polling: 50 });
  } catch {
    throw new Error(`the page never showed state ${wanted} (it shows ${await state(page)}: ${await page.textContent('#detail')})`);
  }
  checks += 1;
}
async function waitFor(page, what, fn, arg) {
  try {
    await page.waitForFunction(fn, arg, { timeout: WAIT_MS, polling: 50 });
  } catch {
    throw new Error(`timed out waiting for ${what}`);
  }
  checks += 1;
}
const payloads = (page) => page.$$eval('#rows tr:not(.empty) td.payload', (tds) => tds.map((td) => td.textContent));

// Debian's Chromium, headless, in a fresh profile; every wait bounded by WAIT_MS.
async function launch(profile) {
  step(`starting ${opt.chromium}`);
  return launchChromium(opt.chromium, profile, WAIT_MS);
}

async function main() {
  const profile = mkdtempSync(join(tmpdir(), 'lightrelay-chromium-'));
  let context = null;
  let proxy = null;
  try {
    context = await launch(profile);
    const page = context.pages()[0] ?? await context.newPage();
    watchConsole(page, 'page');

    // 1. The page loads from the subscribe server and goes live on ?path=.
    step('open the page');
    const response = await page.goto(`${subscribeUrl}/?path=${PATH}`);
    check(response.status() === 200, 'GET / answers 200');
    check(response.headers()['content-type'].startsWith('text/html'), 'the page is text/html');
    await waitState(page, 'live');
    check(await page.evaluate(() => typeof uPlot === 'function'), 'the vendored uPlot loaded');
    check(await page.evaluate(() => window.lightrelay.url) === toWs(subscribeUrl) + PATH + '?format=json&last=1',
      'the socket URL is same-origin + path, asking for envelopes and the latest retained value');
    check(await page.inputValue('#path') === PATH, 'the path box shows ?path=');
    check((await page.title()).includes(PATH), 'the title names the path');
    await ask(`subscribed ${PATH}`);

    // 2. Messages published through the publish server appear, newest first.
    step('publish by POST and by a browser WebSocket');
    const publisher = await context.newPage();
    watchConsole(publisher, 'publisher');
    check(await post('417') === 1, 'POST reaches one Redis receiver (the subscribe server)');
    await publishWs(publisher, ['{"lux": 420.5, "temp": 21.25}', [0x00, 0x01, 0xfe, 0xff, 0x80], '<b>not bold</b>']);
    await waitFor(page, '4 rows', () => window.lightrelay.rows() >= 4);
    const rows = await payloads(page);
    check(JSON.stringify(rows) === JSON.stringify(['<b>not bold</b>', 'binary00 01 fe ff 80', '{"lux": 420.5, "temp": 21.25}', '417']),
      `rows newest first, binary as hex, markup as text: ${JSON.stringify(rows)}`);
    check(await page.$$eval('#rows b', (b) => b.length) === 0, 'a message is never parsed as HTML');
    check(await page.textContent('#rows tr:nth-child(2) td.size') === '5 B', 'a binary row shows its size');
    check(await page.textContent('#count') === '4', 'the received count is 4');
    await waitFor(page, 'two chart points', () => window.lightrelay.chartPoints() === 2);
    const series = await page.evaluate(() => window.lightrelay.series());
    check(JSON.stringify(series) === '["value","lux","temp"]', `a series per numeric field: ${series}`);
    check((await page.textContent('#latest')) === 'lux 420.5 · temp 21.25', 'the latest value shows the JSON fields');

    // 3. A stream of readings: the chart grows and the rate shows.
    step('publish 60 readings, 25 ms apart');
    const readings = Array.from({ length: 60 }, (_, i) =>
      JSON.stringify({ lux: Math.round(500 + 300 * Math.sin(i / 6)), temp: +(21 + Math.sin(i / 15)).toFixed(2) }));
    await publishWs(publisher, readings, 25);
    await waitFor(page, '64 messages', () => window.lightrelay.received === 64);
    await waitFor(page, '62 chart points', () => window.lightrelay.chartPoints() === 62);
    await waitFor(page, 'a non-zero rate', () => /^[1-9][\d.,]* msg\/s$/.test(document.getElementById('rate').textContent));

    // 4. Phone width: nothing wider than the screen.
    step('phone width');
    await page.setViewportSize({ width: 390, height: 844 });
    // The chart follows its box through a ResizeObserver: wait until it was redrawn at the
    // box's new width (uPlot's root element), whatever that width is.
    await waitFor(page, 'the chart redrawn at the phone width', () => {
      const chart = document.getElementById('chart');
      const plot = chart.querySelector('.uplot');
      return window.innerWidth === 390 && plot !== null
        && plot.offsetWidth === Math.max(200, chart.clientWidth);
    });
    const [overflow, culprits] = await page.evaluate(() => [
      document.documentElement.scrollWidth - window.innerWidth,
      [...document.querySelectorAll('body *')]
        .filter((e) => e.getBoundingClientRect().right > window.innerWidth + 0.5)
        .slice(0, 5)
        .map((e) => `${e.tagName.toLowerCase()}#${e.id}.${e.className} right=${e.getBoundingClientRect().right}`),
    ]);
    check(overflow <= 0, `no horizontal scrolling at 390 px (${overflow} px too wide: ${culprits.join(', ')})`);
    if (opt['phone-screenshot']) await page.screenshot({ path: opt['phone-screenshot'], fullPage: false });
    await page.setViewportSize({ width: 1200, height: 900 });

    // 5. The subscribe server goes away: reconnecting with back-off; back: live, and new
    // messages arrive again on the same page.
    step('stop the subscribe server');
    await ask('stop-subscribe');
    await waitState(page, 'reconnecting');
    check(/^in \d+ s$/.test(await page.textContent('#countdown')), 'a countdown to the next attempt');
    check(/1006/.test(await page.textContent('#detail')), 'the close code is shown');
    step('start it again on the same address');
    await ask('start-subscribe');
    await waitState(page, 'live', RECONNECT_WAIT_MS);
    await ask(`subscribed ${PATH}`);
    check(await post('555') === 1, 'POST after the restart reaches the new subscription');
    await waitFor(page, 'the message after the restart as the newest row',
      () => document.querySelector('#rows td.payload')?.textContent === '555');
    check(await page.evaluate(() => window.lightrelay.received) === 65, 'nothing else arrived');
    await waitFor(page, '63 chart points', () => window.lightrelay.chartPoints() === 63);

    // 6. Behind a proxy that serves the relay under /subscribe/ (nginx/lightrelay-tls.conf): the
    // page's links and its socket keep the prefix; ?ws= points a page at another base.
    step('behind a path prefix, and with ?ws=');
    proxy = await startProxy(subscribeUrl);
    const prefixed = await context.newPage();
    watchConsole(prefixed, 'prefixed');
    await prefixed.goto(`${proxy.url}/?path=${PATH}`);
    await waitState(prefixed, 'live');
    check(await prefixed.evaluate(() => typeof uPlot === 'function'), 'uPlot loads under the prefix');
    check(await prefixed.evaluate(() => window.lightrelay.url) === toWs(proxy.url) + PATH + '?format=json&last=1', 'the socket keeps the prefix');
    const pointed = await context.newPage();
    watchConsole(pointed, 'pointed');
    await pointed.goto(`${subscribeUrl}/?path=${PATH}&ws=${encodeURIComponent(proxy.url + '/')}`);
    await waitState(pointed, 'live');
    check(await pointed.evaluate(() => window.lightrelay.url) === toWs(proxy.url) + PATH + '?format=json&last=1', '?ws= sets the socket base');
    check(await post('777') === 1, 'one Redis subscription for every page of the path');
    for (const p of [page, prefixed, pointed]) {
      await waitFor(p, 'the message through the proxy', () => document.querySelector('#rows td.payload')?.textContent === '777');
    }
    await waitFor(prefixed, 'a chart point under the prefix', () => window.lightrelay.chartPoints() === 1);
    await pointed.close();

    // 7. The relay's Redis beside the connection state, from /healthz on the page's own base
    // (through the prefix too): Redis killed, the page says so and shows no green "live".
    step('Redis goes away and comes back');
    for (const p of [page, prefixed]) {
      await waitFor(p, 'Redis: ok', () => document.getElementById('redis').textContent === 'Redis: ok');
    }
    await ask('stop-redis');
    for (const p of [page, prefixed]) {
      await waitFor(p, 'Redis: unavailable', () => window.lightrelay.redis === 'down'
        && /^Redis: unavailable \(.+\)$/.test(document.getElementById('redis').textContent));
      const [shown, colour] = await p.evaluate(() => [document.getElementById('state').textContent,
        document.getElementById('state').dataset.state]);
      check(shown !== 'live' && colour !== 'live',
        `no green "live" without Redis (shows ${shown}, ${colour})`);
    }
    step(`the page says: ${await page.textContent('#redis')}`);
    await page.screenshot({ path: opt.screenshot.replace(/\.png$/, '-no-redis.png'), fullPage: false });
    await ask('start-redis');
    for (const p of [page, prefixed]) {
      await waitFor(p, 'Redis: ok again', () => window.lightrelay.redis === 'ok');
      check(await p.evaluate(() => document.getElementById('state').dataset.state) === 'live', 'live again');
    }
    await prefixed.close();

    // 8. A picture for a person to look at.
    await page.bringToFront();
    await page.screenshot({ path: opt.screenshot, fullPage: false });
    step(`screenshot: ${opt.screenshot}`);

    check(pageErrors.length === 0, `no errors in the browser console:\n  ${pageErrors.join('\n  ')}`);
    process.stdout.write(`PASS live page: ${checks} checks\n`);
  } finally {
    proxy?.close();
    if (context) await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  }
}

// SPEC §8: the subscribe server needs a token (--auth all). Without one the page is refused and
// says so; with ?token= or the Token field it goes live and receives; the token is never shown
// and never lands in localStorage.
async function mainAuth() {
  const profile = mkdtempSync(join(tmpdir(), 'lightrelay-chromium-'));
  let context = null;
  try {
    context = await launch(profile);
    const token = opt.token;

    // 1. No token: refused before the upgrade, which a page sees as 1006; it says so.
    step('open the page without a token');
    const refused = context.pages()[0] ?? await context.newPage();
    watchConsole(refused, 'refused');
    await refused.goto(`${subscribeUrl}/?path=${PATH}`);
    await waitState(refused, 'reconnecting');
    const detail = await refused.textContent('#detail');
    check(/could not connect \(1006\)/.test(detail) && /token/.test(detail), `the refusal is shown with a hint: ${detail}`);
    check(await refused.getAttribute('#token', 'type') === 'password', 'the token field is a password field');
    check(await refused.evaluate(() => window.lightrelay.received) === 0, 'nothing received');

    // 2. ?token= in the page's URL: live, and a message published arrives.
    step('open the page with ?token=');
    const page = await context.newPage();
    watchConsole(page, 'page');
    await page.goto(`${subscribeUrl}/?path=${PATH}&token=${encodeURIComponent(token)}`);
    await waitState(page, 'live');
    check(await page.evaluate(() => window.lightrelay.url) === `${toWs(subscribeUrl)}${PATH}?format=json&last=1&token=…`, 'the socket URL carries the token, shown hidden');
    await ask(`subscribed ${PATH}`);
    check(await post('417') === 1, 'POST reaches the subscribe server');
    await waitFor(page, 'the message with the token', () => document.querySelector('#rows td.payload')?.textContent === '417');
    check(!(await page.evaluate(() => document.body.innerText)).includes(token), 'the token is not shown on the page');
    check(new URL(page.url()).searchParams.get('token') === token, 'the page URL keeps ?token= (a reload keeps working)');

    // 3. The token typed into the field of the refused page: live; kept for the tab only.
    step('enter the token in the field');
    await refused.fill('#token', token);
    await refused.click('#pick button[type=submit]');
    await waitState(refused, 'live');
    check(await post('418') === 1, 'one Redis subscription for both pages');
    await waitFor(page, 'the message on the first page too', () => document.querySelector('#rows td.payload')?.textContent === '418');
    await waitFor(refused, 'the message after entering the token', () => document.querySelector('#rows td.payload')?.textContent === '418');
    check(!new URL(refused.url()).searchParams.has('token'), 'a typed token stays out of the page URL');
    check(await refused.evaluate(() => sessionStorage.getItem('lightrelay.token')) !== null, 'it is kept in sessionStorage');
    check(await refused.evaluate(() => localStorage.length) === 0, 'and nothing in localStorage');

    check(pageErrors.length === 0, `no errors in the browser console:\n  ${pageErrors.join('\n  ')}`);
    process.stdout.write(`PASS live page with tokens: ${checks} checks\n`);
  } finally {
    if (context) await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  }
}

// SPEC §9: both servers keep history. A page opened after values were published shows the
// latest of them at once (?last=1), before anything new is published; after the subscribe
// server restarts, what was published while it was away arrives (?since=), once.
async function mainHistory() {
  const profile = mkdtempSync(join(tmpdir(), 'lightrelay-chromium-'));
  let context = null;
  try {
    context = await launch(profile);

    // 1. Published before any page is open: nobody receives them, the stream keeps them.
    step('publish 41 and 42 with no page open');
    check(await post('41') === 0, 'no subscriber yet');
    check(await post('42') === 0, 'no subscriber yet');

    // 2. The page opens with the latest retained value, and only that one.
    step('open the page');
    const page = context.pages()[0] ?? await context.newPage();
    watchConsole(page, 'page');
    await page.goto(`${subscribeUrl}/?path=${PATH}`);
    await waitState(page, 'live');
    await waitFor(page, 'the latest retained value', () => window.lightrelay.rows() >= 1);
    check(JSON.stringify(await payloads(page)) === '["42"]', `only the latest value: ${JSON.stringify(await payloads(page))}`);
    await waitFor(page, 'a chart point', () => window.lightrelay.chartPoints() === 1);
    check((await page.textContent('#latest')).includes('42'), 'the latest value shows 42');
    check(typeof await page.evaluate(() => window.lightrelay.lastId) === 'string', 'the page knows the message id');

    // 3. Live after the replay.
    await ask(`subscribed ${PATH}`);
    check(await post('43') === 1, 'the page subscribes');
    await waitFor(page, '43 as the newest row', () => document.querySelector('#rows td.payload')?.textContent === '43');

    // 4. The subscribe server restarts; 44 is published while it is away; the page reconnects
    // with ?since= and shows 44 without anything new being published, and nothing twice.
    step('restart the subscribe server, publishing meanwhile');
    await ask('stop-subscribe');
    await waitState(page, 'reconnecting');
    check(await post('44') === 0, 'published while the subscribe server is away');
    await ask('start-subscribe');
    await waitState(page, 'live', RECONNECT_WAIT_MS);
    check(/[?&]since=/.test(await page.evaluate(() => window.lightrelay.url)), 'the reconnect asks since=');
    await waitFor(page, '44 as the newest row', () => document.querySelector('#rows td.payload')?.textContent === '44');
    check(JSON.stringify(await payloads(page)) === '["44","43","42"]', `each once, in order: ${JSON.stringify(await payloads(page))}`);

    check(pageErrors.length === 0, `no errors in the browser console:\n  ${pageErrors.join('\n  ')}`);
    process.stdout.write(`PASS live page with history: ${checks} checks\n`);
  } finally {
    if (context) await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  }
}

const overall = setTimeout(() => {
  process.stderr.write(`live_page.mjs: gave up after ${TOTAL_MS / 1000} s\n`);
  process.exit(1);
}, TOTAL_MS);

(opt.token ? mainAuth() : opt.history ? mainHistory() : main()).then(
  () => { clearTimeout(overall); process.exit(0); },
  (e) => {
    process.stderr.write(`live_page.mjs: ${e.stack || e}\n`);
    if (pageErrors.length) process.stderr.write(`browser console:\n  ${pageErrors.join('\n  ')}\n`);
    process.exit(1);
  },
);
