import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    setupFiles: ['test/setup.ts'],
    // The default output, then what was skipped and why (test/skip_summary.ts).
    reporters: ['default', './test/skip_summary.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Each test file gets its own process (and its own wasm instance); two at a time for 2 cores.
    pool: 'forks',
    maxWorkers: 2,
  },
});
