// What the browser tests share: Debian's Chromium, headless, in a fresh profile; a proxy that
// serves a relay under /subscribe/ (as the TLS nginx site does), WebSocket upgrades included.
import { chromium } from 'playwright-core';
import http from 'node:http';
import net from 'node:net';

export async function launch(executablePath, profile, waitMs) {
  const context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--no-first-run', '--disable-quic',
    ],
    viewport: { width: 1200, height: 900 },
    timeout: waitMs,
  });
  context.setDefaultTimeout(waitMs);
  return context;
}

// ---- a reverse proxy that serves the relay under /subscribe/ (as nginx/lightrelay-tls.conf) --
export function startProxy(target) {
  const { hostname, port } = new URL(target);
  const sockets = new Set();
  const strip = (url) => /^\/subscribe(\/.*)$/.exec(url)?.[1];
  const server = http.createServer((req, res) => {
    const path = strip(req.url);
    if (!path) { res.writeHead(404).end('not under /subscribe/\n'); return; }
    const upstream = http.request({ host: hostname, port, method: req.method, path, headers: req.headers }, (r) => {
      res.writeHead(r.statusCode, r.headers);
      r.pipe(res);
    });
    upstream.on('error', () => res.writeHead(502).end());
    req.pipe(upstream);
  });
  server.on('connection', (s) => { sockets.add(s); s.on('close', () => sockets.delete(s)); });
  server.on('upgrade', (req, client, head) => {
    const path = strip(req.url);
    if (!path) { client.destroy(); return; }
    const upstream = net.connect(Number(port), hostname, () => {
      let request = `${req.method} ${path} HTTP/1.1\r\n`;
      for (let i = 0; i < req.rawHeaders.length; i += 2) request += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
      upstream.write(request + '\r\n');
      upstream.write(head);
      client.pipe(upstream);
      upstream.pipe(client);
    });
    sockets.add(upstream);
    upstream.on('close', () => { sockets.delete(upstream); client.destroy(); });
    upstream.on('error', () => client.destroy());
    client.on('error', () => upstream.destroy());
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => resolve({
      url: `http://127.0.0.1:${server.address().port}/subscribe`,
      close: () => { for (const s of sockets) s.destroy(); server.close(); },
    }));
  });
}
