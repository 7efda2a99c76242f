/** Runs before every test file: the tests run on the wasm backend, as CI does (MISTRAL_BACKEND overrides). */
import { beforeAll } from 'vitest';
import { initBackend } from '../runtime/backend';

// The CLIs the tests spawn inherit this: no first-run note about native backends in their stderr
// (test/install.test.ts removes it to check the note itself).
process.env.MISTRAL_NO_BACKEND_NOTE ??= '1';

beforeAll(async () => {
  await initBackend(process.env.MISTRAL_BACKEND ?? 'wasm', { quiet: true });
});
