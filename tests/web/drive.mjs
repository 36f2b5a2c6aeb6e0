// Drives the system Chromium through playwright-core for tests/web/test_web.py: one browser for many
// commands, one JSON object a line on stdin, one JSON answer a line on stdout ({ok, value} or
// {ok: false, error}). Every request a page makes is logged; any not to 127.0.0.1 is refused.
//
//   {"op": "open", "url": "http://127.0.0.1:PORT/"}     a fresh context and page; waits for cvae.ready
//   {"op": "eval", "expression": "..."}                 page.evaluate (a promise is awaited)
//   {"op": "click" | "check" | "uncheck", "selector"}    {"op": "fill", "selector", "value"}
//   {"op": "files", "selector", "path"}                 set a file input's file
//   {"op": "download", "selector", "path"}              click and save the download there
//   {"op": "visible", "selector"}                       how many matching elements are visible
//   {"op": "screenshot", "path", "selector"?}           {"op": "requests"}  {"op": "close"}
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const browser = await chromium.launch({
  executablePath,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', ...(process.env.CHROMIUM_ARGS || '').split(' ').filter(Boolean)],
});  // playwright gives the browser a new, empty profile (user data dir) of its own
let context = null, page = null, requests = [], errors = [];

async function open(url) {
  if (context) await context.close();
  requests = [];
  errors = [];
  context = await browser.newContext({ acceptDownloads: true, viewport: { width: 1180, height: 760 } });
  await context.route('**/*', (route) => {
    const target = new URL(route.request().url());
    requests.push(route.request().url());
    return target.protocol === 'blob:' || target.protocol === 'data:' || target.hostname === '127.0.0.1' ? route.continue() : route.abort();
  });
  page = await context.newPage();
  page.on('pageerror', (error) => errors.push(String(error)));
  page.on('console', (message) => message.type() === 'error' && errors.push(message.text()));
  await page.goto(url);
  await page.waitForFunction(() => window.cvae !== undefined);
  await page.evaluate(() => window.cvae.ready);
  await page.evaluate(() => window.cvae.idle());
  return { backend: await page.evaluate(() => window.cvae.backend), errors };
}

const ops = {
  open: (c) => open(c.url),
  eval: (c) => page.evaluate(c.expression),
  click: (c) => page.click(c.selector),
  check: (c) => page.check(c.selector),
  uncheck: (c) => page.uncheck(c.selector),
  fill: (c) => page.fill(c.selector, c.value),
  files: (c) => page.setInputFiles(c.selector, c.path),
  async download(c) {
    const [download] = await Promise.all([page.waitForEvent('download'), page.click(c.selector)]);
    await download.saveAs(c.path);
    return download.suggestedFilename();
  },
  visible: (c) => page.locator(c.selector).evaluateAll((nodes) => nodes.filter((n) => n.checkVisibility()).length),
  async screenshot(c) {
    await (c.selector ? page.locator(c.selector) : page).screenshot({ path: c.path });
    return c.path;
  },
  requests: () => ({ requests, errors }),
};

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const command = JSON.parse(line);
  if (command.op === 'close') break;
  let answer;
  try {
    const value = await ops[command.op](command);
    answer = { ok: true, value: value === undefined ? null : value };
  } catch (error) {
    answer = { ok: false, error: String(error && error.message || error).split('\n').slice(0, 6).join(' ') };
  }
  process.stdout.write(JSON.stringify(answer) + '\n');
}
if (context) await context.close();
await browser.close();
process.exit(0);  // stdin, still open on the test's side, would keep node alive
