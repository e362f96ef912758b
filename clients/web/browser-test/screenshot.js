// Renders docs/web-page.png: two real pages (Ada and Grace, 640×720 each)
// chatting in the lobby, put side by side by a third page that shows the
// two screenshots as images. Not a test.
//
//   node browser-test/screenshot.js
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { WEB_DIR, launch, openChat, pageServer, sendText, startGateway, stopGateway, waitForCount } from './harness.js';

const out = fileURLToPath(new URL('../../../docs/web-page.png', import.meta.url));
const g = await startGateway({ heartbeat: [25000, 20000] });
const served = Buffer.from(await (await fetch(`${g.http}/app.js`)).arrayBuffer());
const server = await pageServer(g, { fromDisk: !served.equals(readFileSync(`${WEB_DIR}app.js`)) });
const browser = await launch();
try {
  const viewport = { width: 640, height: 720 };
  const ada = await openChat(browser, server.url, 'Ada', { viewport });
  const grace = await openChat(browser, server.url, 'Grace', { viewport });
  const room = 'public:lobby';
  const lines = [
    [ada, 'Morning! Is the new gateway build up?'],
    [grace, 'Yes, since 9. Resume after a restart works now: I lost nothing.'],
    [ada, 'Nice. I tried a 10 s outage on my laptop, the gap came back in order.'],
    [grace, 'And a message with <b>markup</b> stays text, as it should.'],
  ];
  for (const [page, text] of lines) {
    await sendText(page, text);
    await waitForCount(page == ada ? grace : ada, room, text, 1);
  }
  const last = (p) => p.locator(`.log[data-room="${room}"] li.msg`).nth(1);
  await last(grace).hover();
  await last(grace).locator('[data-testid=react][data-emoji="🎉"]').click();
  await ada.waitForSelector('[data-testid=reaction][data-emoji="🎉"]');
  await ada.waitForTimeout(3100); // typing is reported at most once per 3 s
  await ada.fill('#text', 'Shipping it');
  await grace.waitForSelector('#typing:text("Ada is typing…")');
  await grace.mouse.move(0, 0);
  await grace.evaluate(() => document.activeElement?.blur());
  const shots = [await ada.screenshot(), await grace.screenshot()];
  const frame = await (await browser.newContext({ viewport: { width: 1288, height: 720 } })).newPage();
  await frame.setContent(
    `<body style="margin:0;background:#9aa4ae;display:flex;gap:8px">${shots
      .map((b) => `<img width="640" height="720" src="data:image/png;base64,${b.toString('base64')}">`)
      .join('')}</body>`,
  );
  await frame.screenshot({ path: out });
  console.log(`wrote ${out}: ${readFileSync(out).length} bytes`);
} finally {
  await browser.close();
  server.close();
  await stopGateway(g);
}
