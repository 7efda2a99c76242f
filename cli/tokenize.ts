/**
 * The `tokenize` and `detokenize` commands, like llama.cpp's tokenize tool:
 *
 *   one_file_ref.ts tokenize PATH "Hello world" [TEXT ...]   each TEXT (or -p TEXT, -f FILE) -> one JSON array of ids per line
 *   one_file_ref.ts tokenize PATH [--plain] [--no-bos]        stdin: one JSON string per line (--plain: one text per line)
 *   one_file_ref.ts detokenize PATH                          stdin: one JSON array of ids per line -> one JSON string per line
 *
 * PATH is a SentencePiece model file (whatever its name) or a model folder holding tokenizer.model.
 * Stdin lines are JSON by default, so that any text (newlines, tabs, leading spaces) round-trips;
 * --plain takes each line as it is. Each line is answered as soon as it is read; a bad line stops
 * the command with an error naming its line number (the lines before it have been answered). On a
 * terminal, a hint on stderr says what is read. Ids never include EOS; tokenize puts BOS first
 * unless --no-bos, detokenize decodes BOS/EOS to nothing, as SentencePiece does.
 */
import * as fs from 'fs';
import * as path from 'path';
import * as readline from 'readline';
import { parseArgs } from 'util';
import { SentencePieceProcessor, TokenizerError } from '../tokenizer';
import { readPromptFile } from './prompt_file';

/** A bad command line or input line; the message is one line, e.g. "stdin line 3: expected a JSON string". */
export class TokenizeCommandError extends Error {
  override name = 'TokenizeCommandError';
}

/** Where the commands read and write; the process's stdin/stdout unless a test passes its own. */
export interface CommandIO {
  input: NodeJS.ReadableStream;
  output: NodeJS.WritableStream;
}

export const TOKENIZE_HELP = `Usage:
  npx ts-node one_file_ref.ts tokenize PATH [TEXT ...] [-p TEXT] [-f FILE] [--plain] [--no-bos]
      Prints the token ids of each TEXT, as a JSON array per line: TEXT given as arguments, with
      -p/--prompt TEXT, or -f/--file FILE (the whole file, UTF-8; "-" is stdin), in that order.
      Without any, reads stdin: one JSON string per line by default (e.g. "Hello world", quotes
      included, so that any text fits on a line), or with --plain each line as plain text.
      --plain    stdin lines are plain text, not JSON
      --no-bos   leave out the BOS id (by default it comes first, as the reference's Tokenizer.encode)
  npx ts-node one_file_ref.ts detokenize PATH
      Reads one JSON array of token ids per line on stdin, prints the decoded text as a JSON string per line.

PATH is a SentencePiece tokenizer model file (any name) or a model folder with tokenizer.model.
A line that is not what is expected stops the command with exit code 1 and an error naming the line.
`;

/** `tokenize PATH [TEXT ...] [-p TEXT] [-f FILE] [--plain] [--no-bos]`; argv is what follows the command name. */
export async function tokenizeCommand(argv: string[], io: CommandIO = stdio()): Promise<void> {
  const { values, positionals, tokens } = parse(argv, 'tokenize', {
    'no-bos': { type: 'boolean' },
    plain: { type: 'boolean' },
    prompt: { type: 'string', multiple: true, short: 'p' },
    file: { type: 'string', multiple: true, short: 'f' },
  });
  if (values.help) return write(io.output, TOKENIZE_HELP);
  const target = positionals[0];
  if (target === undefined) throw new TokenizeCommandError('tokenize: missing PATH (a tokenizer model file or a model folder)');
  // The texts in the order given: arguments, -p and -f in place.
  const texts: string[] = [];
  let positional = 0;
  for (const token of tokens) {
    if (token.kind === 'positional' && positional++ > 0) texts.push(token.value);
    if (token.kind === 'option' && token.value !== undefined) {
      if (token.name === 'prompt') texts.push(token.value);
      if (token.name === 'file') texts.push(readPromptFile(token.value, token.rawName));
    }
  }
  const tokenizer = await loadTokenizer(target);
  const bos = values['no-bos'] !== true;
  if (texts.length > 0) {
    for (const text of texts) await write(io.output, JSON.stringify(tokenizer.encode(text, bos)) + '\n');
    return;
  }
  if (isTerminal(io.input)) {
    process.stderr.write(
      values.plain
        ? 'tokenize: reading text from the terminal, one line at a time; Ctrl-D ends\n'
        : 'tokenize: reading one JSON string per line, e.g. "Hello world" with the quotes (or use --plain for plain ' +
            'lines, or give the text as an argument: tokenize PATH "Hello world"); Ctrl-D ends\n',
    );
  }
  await eachLine(io, (line, where) => {
    if (values.plain) return JSON.stringify(tokenizer.encode(line, bos));
    const text = parseLine(line, where);
    if (typeof text !== 'string') throw new TokenizeCommandError(`${where}: expected a JSON string, got ${describe(text)}`);
    return JSON.stringify(tokenizer.encode(text, bos));
  });
}

/** `detokenize PATH`; argv is what follows the command name. */
export async function detokenizeCommand(argv: string[], io: CommandIO = stdio()): Promise<void> {
  const { values, positionals } = parse(argv, 'detokenize', {});
  if (values.help) return write(io.output, TOKENIZE_HELP);
  const tokenizer = await loadTokenizer(onePath(positionals, 'detokenize'));
  const n = tokenizer.vocabSize;
  if (isTerminal(io.input)) {
    process.stderr.write('detokenize: reading one JSON array of token ids per line, e.g. [1, 22557, 1526]; Ctrl-D ends\n');
  }
  await eachLine(io, (line, where) => {
    const ids = parseLine(line, where);
    if (!Array.isArray(ids)) throw new TokenizeCommandError(`${where}: expected a JSON array of token ids, got ${describe(ids)}`);
    ids.forEach((id: unknown, i) => {
      if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id >= n) {
        throw new TokenizeCommandError(`${where}: ${describeId(id, i)} is not an integer in [0, ${n})`);
      }
    });
    return JSON.stringify(tokenizer.decode(ids as number[]));
  });
}

/**
 * The tokenizer at `target`: the file itself, or `tokenizer.model` in a folder (or, failing that, the
 * folder's one `tokenizer.model.*` file, as mistral-common names them: tokenizer.model.v1, .v3).
 */
export async function loadTokenizer(target: string): Promise<SentencePieceProcessor> {
  let stat: fs.Stats;
  try {
    stat = fs.statSync(target);
  } catch {
    throw new TokenizeCommandError(`${target}: no such file or folder (expected a tokenizer model file or a model folder)`);
  }
  if (!stat.isDirectory()) return SentencePieceProcessor.load(target);
  const standard = path.join(target, 'tokenizer.model');
  if (fs.existsSync(standard)) return SentencePieceProcessor.load(standard);
  const versioned = fs.readdirSync(target).filter((f) => f.startsWith('tokenizer.model.')).sort();
  if (versioned.length === 1) return SentencePieceProcessor.load(path.join(target, versioned[0]));
  if (versioned.length > 1) {
    throw new TokenizeCommandError(`${target}: several tokenizers (${versioned.join(', ')}): give the file itself`);
  }
  throw new TokenizeCommandError(`${standard}: missing (expected a tokenizer model file or a model folder with tokenizer.model)`);
}

/**
 * "token id X at position I" for an element of a detokenize line, shown briefly: a number too large
 * for a double (1e400 reads as Infinity) says so, a long string is cut, and an array or object is
 * named by its kind, never printed (it may be nested 100,000 levels deep).
 */
function describeId(id: unknown, i: number): string {
  if (typeof id === 'number' && !Number.isFinite(id)) {
    return `token id at position ${i} is a number beyond a double's range (read as ${id}), so it`;
  }
  if (typeof id === 'number') return `token id ${id} at position ${i}`;
  if (typeof id === 'string') return `token id ${id.length > 40 ? `${JSON.stringify(id.slice(0, 40))}...` : JSON.stringify(id)} at position ${i}`;
  if (typeof id === 'boolean') return `token id ${id} at position ${i}`;
  return `token id at position ${i} is ${Array.isArray(id) ? 'a nested array' : describe(id)}, which`;
}

function isTerminal(input: NodeJS.ReadableStream): boolean {
  return (input as NodeJS.ReadableStream & { isTTY?: boolean }).isTTY === true;
}

function stdio(): CommandIO {
  return { input: process.stdin, output: process.stdout };
}

type Options = Record<string, { type: 'boolean' | 'string'; multiple?: boolean; short?: string }>;

function parse<O extends Options>(argv: string[], command: string, options: O) {
  try {
    return parseArgs({
      args: argv,
      // --verbose is cli/main.ts's (it adds stack traces to errors): accepted here and ignored.
      options: { ...options, help: { type: 'boolean', short: 'h' }, verbose: { type: 'boolean' } },
      allowPositionals: true,
      strict: true,
      tokens: true,
    });
  } catch (err) {
    // Node's text goes on with advice about '--'; the first sentence is the point.
    throw new TokenizeCommandError(`${command}: ${(err as Error).message.split('\n', 1)[0].split('. To specify', 1)[0]}`);
  }
}

function onePath(positionals: string[], command: string): string {
  if (positionals.length === 0) throw new TokenizeCommandError(`${command}: missing PATH (a tokenizer model file or a model folder)`);
  if (positionals.length > 1) throw new TokenizeCommandError(`${command}: unexpected argument "${positionals[1]}" after PATH`);
  return positionals[0];
}

/** Calls `answer` on each stdin line (numbered from 1) and prints what it returns, one line each. */
async function eachLine(io: CommandIO, answer: (line: string, where: string) => string): Promise<void> {
  const lines = readline.createInterface({ input: io.input, crlfDelay: Infinity });
  let number = 0;
  try {
    for await (const line of lines) {
      number++;
      const where = `stdin line ${number}`;
      let out: string;
      try {
        out = answer(line, where);
      } catch (err) {
        if (err instanceof TokenizerError) throw new TokenizeCommandError(`${where}: ${err.message}`);
        throw err;
      }
      await write(io.output, out + '\n');
    }
  } finally {
    lines.close();
  }
}

function parseLine(line: string, where: string): unknown {
  if (line.trim() === '') throw new TokenizeCommandError(`${where}: empty line, expected one JSON value`);
  try {
    return JSON.parse(line);
  } catch (err) {
    throw new TokenizeCommandError(`${where}: not valid JSON (${(err as Error).message.split('\n', 1)[0]})`);
  }
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  const type = typeof value;
  return type === 'object' ? 'an object' : `a ${type}`;
}

/** Writes `text`, waiting when the stream asks (so a large input does not pile up in memory). */
function write(output: NodeJS.WritableStream, text: string): Promise<void> {
  return new Promise((resolve, reject) => {
    output.write(text, (err) => (err ? reject(err) : resolve()));
  });
}
