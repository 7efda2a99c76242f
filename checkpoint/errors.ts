/**
 * The one error type thrown for bad checkpoint / .npy input: a single-line
 * message of the form "<file>: <what is wrong>".
 */
export class CheckpointError extends Error {
  override readonly name = 'CheckpointError';
  /** The file the problem was found in. */
  readonly file: string;

  constructor(file: string, problem: string) {
    super(`${file}: ${problem}`.replace(/\s*\n\s*/g, ' '));
    this.file = file;
  }
}
