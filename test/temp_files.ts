/** What the bad-input tests (hostile_input, integrity, special_files) share: a temporary folder, and the error a call throws. */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { afterAll } from 'vitest';

export interface TempFolder {
  dir: string;
  /** A new path in the folder, `<n>-<name>`, never handed out before. */
  path(name: string): string;
  /** `bytes` written to a new path in the folder; its path. */
  file(name: string, bytes: Uint8Array): string;
}

/** Call at a test file's top level: a new folder under the system's temporary one, removed after the file. */
export function tempFolder(prefix: string): TempFolder {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
  let made = 0;
  const newPath = (name: string): string => path.join(dir, `${made++}-${name}`);
  return {
    dir,
    path: newPath,
    file(name, bytes) {
      const file = newPath(name);
      fs.writeFileSync(file, bytes);
      return file;
    },
  };
}

/** The error `fn` throws (or its promise rejects with); fails when there is none. */
export async function caught(fn: () => unknown): Promise<Error> {
  try {
    await fn();
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected an error');
}
