/**
 * Synchronization points under the seeded simulator (test/sim/sync-sim.ts): as many
 * seeds as fit in a small time budget, from a base seed printed first. Replay one
 * with DVE_SIM_SEED=<seed> (runs just that seed).
 */
import test from 'ava';

import { runSyncSim } from './sync-sim.js';

const BUDGET_MS = 1500;
const MAX_SEEDS = 5000;

test('sync points: seeded runs within the time budget keep every invariant', (t) => {
  const fixed = process.env.DVE_SIM_SEED;
  const base = fixed !== undefined ? Number(fixed) : 0x5eed0000;
  t.log(`seed ${base}${fixed !== undefined ? ' (fixed)' : ''}`);
  const deadline = Date.now() + BUDGET_MS;
  let runs = 0;
  for (let seed = base; runs < (fixed !== undefined ? 1 : MAX_SEEDS) && Date.now() < deadline; seed++, runs++) {
    runSyncSim(seed >>> 0); // throws naming the seed on any violation
  }
  t.log(`${runs} seeds`);
  t.true(runs > 0);
});
