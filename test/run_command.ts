/** Running the CLI inside the test's own process, what it writes captured (gguf and perplexity tests). */
import { run } from '../cli/main';

/** Runs a command in this process, its stdout and stderr captured; a rejection of run() passes through. */
export async function runCommand(argv: string[]): Promise<{ stdout: string; stderr: string }> {
  const out: string[] = [];
  const err: string[] = [];
  const write = (sink: string[]) => (chunk: string | Uint8Array): boolean => {
    sink.push(typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString());
    return true;
  };
  const stdout = process.stdout.write;
  const stderr = process.stderr.write;
  process.stdout.write = write(out) as typeof process.stdout.write;
  process.stderr.write = write(err) as typeof process.stderr.write;
  try {
    await run(argv);
  } finally {
    process.stdout.write = stdout;
    process.stderr.write = stderr;
  }
  return { stdout: out.join(''), stderr: err.join('') };
}
