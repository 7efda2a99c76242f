/** Runs before every test file: the tests run on the wasm backend, as CI does (MISTRAL_BACKEND overrides). */
import { beforeAll } from 'vitest';
import { initBackend } from '../runtime/backend';

beforeAll(async () => {
  await initBackend(process.env.MISTRAL_BACKEND ?? 'wasm', { quiet: true });
});
