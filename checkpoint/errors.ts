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

/** Nesting shown by showValue; deeper arrays and objects are written [...] and {...}. */
const SHOW_DEPTH = 3;
/** Items shown per array or object, and characters per string. */
const SHOW_ITEMS = 8;
const SHOW_CHARS = 100;

/**
 * A value read from a file (JSON, a pickle), written for a message the way JSON writes it, but
 * bounded: a few levels deep, a few items per level. JSON.stringify of a 100,000-deep array from a
 * hostile file would overflow the call stack; this never goes deeper than SHOW_DEPTH.
 */
export function showValue(value: unknown, depth = 0): string {
  if (typeof value === 'string') return JSON.stringify(value.length > SHOW_CHARS ? `${value.slice(0, SHOW_CHARS)}...` : value);
  if (value === null || typeof value !== 'object') return String(value);
  const items: string[] = [];
  const entries = Array.isArray(value) ? value : Object.entries(value);
  const shown = depth >= SHOW_DEPTH ? [] : entries.slice(0, SHOW_ITEMS);
  for (const entry of shown) {
    items.push(Array.isArray(value) ? showValue(entry, depth + 1) : `${JSON.stringify((entry as [string, unknown])[0])}:${showValue((entry as [string, unknown])[1], depth + 1)}`);
  }
  if (entries.length > shown.length) items.push(shown.length === 0 ? '...' : `... ${entries.length - shown.length} more`);
  return Array.isArray(value) ? `[${items.join(',')}]` : `{${items.join(',')}}`;
}
