/**
 * The one error type thrown for bad checkpoint / .npy input: a single-line
 * message of the form "<file>: <what is wrong>".
 */

/** Longest problem text kept whole; a longer one (a name read from a corrupt file, say) keeps its start and end. */
const MAX_PROBLEM = 1000;

/** Folds line breaks (with the blanks around them) into a space and writes other control characters as \xNN. */
function oneLine(text: string): string {
  return text
    .replace(/\s*[\n\r\v\f\u0085\u2028\u2029]\s*/g, ' ')
    .replace(/[\u0000-\u001f\u007f-\u009f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

function shorten(text: string): string {
  if (text.length <= MAX_PROBLEM) return text;
  const keep = MAX_PROBLEM / 2;
  return `${text.slice(0, keep)} [... ${text.length - 2 * keep} characters left out ...] ${text.slice(-keep)}`;
}

export class CheckpointError extends Error {
  override readonly name = 'CheckpointError';
  /** The file the problem was found in. */
  readonly file: string;

  constructor(file: string, problem: string) {
    super(`${oneLine(file)}: ${shorten(oneLine(problem))}`);
    this.file = file;
  }
}
