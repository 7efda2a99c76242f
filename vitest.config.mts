import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    setupFiles: ['test/setup.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Each test file gets its own process (and its own wasm instance); two at a time for 2 cores.
    pool: 'forks',
    maxWorkers: 2,
  },
});
