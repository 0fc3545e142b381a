#!/usr/bin/env node
// The `dve` command: runs the compiled CLI (npm ci / npm run build compile it to dist/).
// The worker pool that runs disk I/O is sized before anything starts it.
process.env.UV_THREADPOOL_SIZE ??= '8';
await import('../dist/src/cli/main.js');
