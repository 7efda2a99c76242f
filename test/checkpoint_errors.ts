/** Test helper: the one shape every checkpoint reader's error takes. */
import { expect } from 'vitest';
import { CheckpointError } from '../checkpoint/errors';

/** Asserts that `fn` throws a CheckpointError whose one-line message names `file` and matches `problem`. */
export function expectCheckpointError(fn: () => unknown, file: string, problem: RegExp): void {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(CheckpointError);
  const message = (caught as Error).message;
  expect(message).not.toContain('\n');
  expect(message.startsWith(file)).toBe(true);
  expect(message).toMatch(problem);
}
