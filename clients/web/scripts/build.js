// Type-checks and emits .d.ts (tsc), bundles and minifies (esbuild), then
// enforces the size budget: the library must stay under 6 KiB gzipped.
import { execFileSync } from 'node:child_process';
import { readFileSync, rmSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import { build } from 'esbuild';

const BUDGET = 6144;
rmSync('dist', { recursive: true, force: true });
execFileSync(process.execPath, ['node_modules/typescript/bin/tsc', '-p', 'tsconfig.json'], { stdio: 'inherit' });
await build({
  entryPoints: ['src/index.ts'],
  outfile: 'dist/chatgate.js',
  bundle: true,
  format: 'esm',
  target: 'es2020',
  minify: true,
  // Internal members are spelled `_x`; renaming them is safe because no
  // protocol field starts with an underscore.
  mangleProps: /^_/,
  legalComments: 'none',
});
const js = readFileSync('dist/chatgate.js');
const gz = gzipSync(js, { level: 9 }).length;
console.log(`dist/chatgate.js: ${js.length} bytes minified, ${gz} bytes gzipped (budget ${BUDGET})`);
if (gz > BUDGET) {
  console.error(`size budget exceeded by ${gz - BUDGET} bytes`);
  process.exit(1);
}
