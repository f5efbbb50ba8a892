// What the browser tests share: Debian's Chromium, headless, in a fresh profile.
import { chromium } from 'playwright-core';

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
