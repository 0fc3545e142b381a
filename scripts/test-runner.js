#!/usr/bin/env node
// Runs every ava suite with the TAP reporter, passes its output through, and ends
// with the line CI reads: `N passed, N failed`. Exit status is non-zero on any failure
// (or when no test ran at all). Extra arguments go to ava (file globs, --match …).
import { spawn } from 'node:child_process';

const args = ['ava', '--tap', ...process.argv.slice(2)];
const child = spawn('npx', args, { stdio: ['ignore', 'pipe', 'inherit'], env: process.env });
let passed = 0;
let failed = 0;
let pending = '';
child.stdout.on('data', (chunk) => {
  process.stdout.write(chunk);
  pending += chunk.toString('utf8');
  let nl;
  while ((nl = pending.indexOf('\n')) >= 0) {
    const line = pending.slice(0, nl);
    pending = pending.slice(nl + 1);
    if (/^ok \d+/.test(line) && !/# SKIP/.test(line)) passed++;
    else if (/^not ok \d+/.test(line)) failed++;
  }
});
child.on('close', (code) => {
  if (code !== 0 && failed === 0) failed = 1; // ava itself failed (crash, timeout, uncaught error)
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed > 0 || passed === 0 ? 1 : 0);
});
