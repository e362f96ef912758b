// Builds the chat page (page/) into the gateway's embedded assets
// (crates/gateway/web/): app.ts and the library bundled and minified into
// app.js, index.html and app.css copied. Those files are committed, so the
// gateway builds without Node; `--check` builds in memory and fails when
// the committed files differ from a fresh build of the sources.
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';
import { build } from 'esbuild';

const root = fileURLToPath(new URL('..', import.meta.url));
const args = process.argv.slice(2);
const check = args.includes('--check');
// --out DIR/ writes somewhere else (e.g. to try a change without touching the committed files).
const out = args.includes('--out') ? args[args.indexOf('--out') + 1] : fileURLToPath(new URL('../../../crates/gateway/web/', import.meta.url));

// Strict type-check of the page together with the library (no output).
execFileSync(process.execPath, [`${root}node_modules/typescript/bin/tsc`, '-p', `${root}page/tsconfig.json`], { stdio: 'inherit' });

const bundle = await build({
  entryPoints: [`${root}page/app.ts`],
  bundle: true,
  write: false,
  format: 'esm',
  target: 'es2020',
  minify: true,
  mangleProps: /^_/, // the library's internal members, as in its own bundle
  legalComments: 'none',
  charset: 'utf8',
  outfile: 'app.js',
});
const files = {
  'index.html': readFileSync(`${root}page/index.html`),
  'app.js': Buffer.from(bundle.outputFiles[0].contents),
  'app.css': readFileSync(`${root}page/app.css`),
};

let stale = [];
for (const [name, bytes] of Object.entries(files)) {
  if (check) {
    let committed;
    try {
      committed = readFileSync(out + name);
    } catch {
      committed = Buffer.alloc(0);
    }
    if (!committed.equals(bytes)) stale.push(name);
  } else {
    writeFileSync(out + name, bytes);
  }
}
if (stale.length) {
  console.error(`crates/gateway/web/ is not a build of clients/web/page: ${stale.join(', ')} differ. Run npm run build and commit the result.`);
  process.exit(1);
}
const js = files['app.js'];
console.log(
  `${relative(process.cwd(), out + 'app.js')}: ${js.length} bytes minified, ${gzipSync(js, { level: 9 }).length} bytes gzipped` +
    (check ? ' (matches the committed build)' : ''),
);
