/**
 * The `serve` command: the model behind an OpenAI-compatible REST API (server/app.ts), as Mistral's
 * deployment docs serve it, so that any OpenAI client library can call it.
 *
 *   one_file_ref.ts serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY]
 *       [--model-name NAME] [--max-body-bytes N] [--max-queue N] [--timeout SECONDS]
 *       [--max-connections N]
 *
 * It binds the port first, so that a port in use is an error at once, then loads the model (the
 * API answers 503 and /health "loading" meanwhile). It runs until SIGINT, SIGTERM or SIGHUP, or
 * until the process that started it goes (npx killed, a terminal closed), then stops taking
 * requests, ends those in flight and exits 0. If the model's backend stops working it exits 1.
 */
import * as fs from 'fs';
import * as path from 'path';
import type { FastifyInstance } from 'fastify';
import { withModel } from '../generation/generate';
import { buildServer, DEFAULT_BODY_LIMIT, DEFAULT_MAX_CONNECTIONS, DEFAULT_TIMEOUT_SECONDS, serverUrl } from '../server/app';
import { DEFAULT_MAX_QUEUE, ModelHost } from '../server/model_host';
import { COMMON_HELP, modelPath, parseCommandLine, parseIntFlag, UsageError, type OptionSpec } from './args';
import { checkLoadFlags, loadForCommand } from './load';
import { isAlive } from '../runtime/processes';

export const SERVE_HELP = `  npx ts-node one_file_ref.ts serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                      [--model-name NAME] [--max-body-bytes N] [--max-queue N] [--timeout S]
                      [--max-connections N]
      An OpenAI-compatible REST API: GET /v1/models, POST /v1/completions, POST
      /v1/chat/completions (the Mistral-7B-Instruct template), GET /health. Requests take turns
      on the model in the order they come; stream: true sends one event per token. One line per
      request on stderr (--quiet: none).
      --host HOST          address to listen on (default 127.0.0.1: this machine only)
      --port N             port (default 8000; 0 picks a free one)
      --api-key KEY        require "Authorization: Bearer KEY" on every route but /health
                           (default: none; also MISTRAL_API_KEY=KEY)
      --model-name NAME    the model id clients send (default: MODEL's folder name)
      --max-body-bytes N   larger request bodies get 413 (default ${DEFAULT_BODY_LIMIT})
      --max-queue N        requests waiting for or running on the model at once; more get 429
                           (default ${DEFAULT_MAX_QUEUE})
      --timeout S          seconds a client has to send a request's headers and its whole body,
                           and that an idle keep-alive connection stays open (default ${DEFAULT_TIMEOUT_SECONDS})
      --max-connections N  connections open at once; more are closed as they come (default ${DEFAULT_MAX_CONNECTIONS})
`;

const OPTIONS = {
  host: { type: 'string' },
  port: { type: 'string' },
  'api-key': { type: 'string' },
  'model-name': { type: 'string' },
  'max-body-bytes': { type: 'string' },
  'max-queue': { type: 'string' },
  timeout: { type: 'string' },
  'max-connections': { type: 'string' },
} as const satisfies OptionSpec;

/** The model id of a model path: its folder's name, or a .tar's name without the extension. */
export function defaultModelName(model: string): string {
  return path.basename(path.resolve(model)).replace(/\.tar$/i, '');
}

/** A server started by startServe(): where it listens, and how to stop it and free its model. */
export interface RunningServer {
  app: FastifyInstance;
  host: ModelHost;
  /** http://HOST:PORT */
  url: string;
  /** Stops taking requests, ends those in flight (their clients see the connection close) and disposes the model. */
  stop(): Promise<void>;
}

export interface ServeHooks {
  /** Called once the port is bound, before the model loads. */
  onListening?: (url: string) => void;
  /** Called when the model's backend stops working (default: print the message and exit 1). */
  onFatal?: (message: string) => void;
}

const isLoopback = (host: string): boolean => /^(localhost|127(\.\d{1,3}){3}|::1|\[::1\]|::ffff:127(\.\d{1,3}){3})$/i.test(host.trim());

/** Parses the command line, listens, then loads the model; undefined after printing --help. */
export async function startServe(argv: string[], hooks: ServeHooks = {}): Promise<RunningServer | undefined> {
  const { values, positionals } = parseCommandLine(argv, OPTIONS);
  if (values.help) {
    process.stdout.write(`Usage:\n${SERVE_HELP}\n${COMMON_HELP}`);
    return undefined;
  }
  const model = modelPath(positionals);
  const host = values.host ?? '127.0.0.1';
  if (host.trim() === '') throw new UsageError('--host must not be empty');
  const port = parseIntFlag('port', values.port, 8000);
  if (port > 65535) throw new UsageError(`--port must be an integer in [0, 65535], got "${values.port}"`);
  const bodyLimit = parseIntFlag('max-body-bytes', values['max-body-bytes'], DEFAULT_BODY_LIMIT, 1);
  const maxQueue = parseIntFlag('max-queue', values['max-queue'], DEFAULT_MAX_QUEUE, 1);
  const timeoutSeconds = parseIntFlag('timeout', values.timeout, DEFAULT_TIMEOUT_SECONDS, 1);
  if (timeoutSeconds > 86_400) throw new UsageError(`--timeout must be at most 86400 seconds, got "${values.timeout}"`);
  const maxConnections = parseIntFlag('max-connections', values['max-connections'], DEFAULT_MAX_CONNECTIONS, 1);
  const apiKey = values['api-key'] ?? process.env.MISTRAL_API_KEY;
  if (apiKey !== undefined && apiKey.trim() === '') throw new UsageError('--api-key must not be empty');
  checkLoadFlags(values); // --pool, --threads, --quantize: a bad one is an error before binding
  const modelName = values['model-name'] ?? defaultModelName(model);
  if (modelName.trim() === '') throw new UsageError('--model-name must not be empty');
  const say = (line: string): void => {
    if (!values.quiet) process.stderr.write(`${line}\n`);
  };
  if (!isLoopback(host) && apiKey === undefined) {
    process.stderr.write(`warning: --host ${host} takes connections from other machines and no --api-key is set: anyone who reaches this port can use the model\n`);
  }

  // Bind first: a port in use is an error now, not after loading the model.
  const exitOnFatal = (message: string): void => {
    process.stderr.write(`error: ${message}\n`);
    setTimeout(() => process.exit(1), 200); // time for the failed request's 500 to go out
  };
  const modelHost = new ModelHost({ maxQueue, onFatal: hooks.onFatal ?? exitOnFatal });
  const app = buildServer({ host: modelHost, modelName, apiKey, bodyLimit, timeoutSeconds, maxConnections, log: values.quiet ? undefined : say });
  try {
    await app.listen({ host, port });
  } catch (err) {
    await app.close();
    const e = err as NodeJS.ErrnoException;
    if (e.code === 'EADDRINUSE') throw new UsageError(`--port ${port}: the address ${host}:${port} is already in use`);
    if (e.code === 'EADDRNOTAVAIL' || e.code === 'ENOTFOUND') throw new UsageError(`--host ${host}: not an address of this machine`);
    if (e.code === 'EACCES') throw new UsageError(`--port ${port}: not allowed to listen on it (ports below 1024 need privileges)`);
    throw err;
  }
  const url = serverUrl(app);
  hooks.onListening?.(url);
  say(`listening at ${url}; loading the model (requests get 503 until it is ready)`);

  let loaded;
  try {
    loaded = await loadForCommand(model, values, 1);
  } catch (err) {
    await app.close();
    throw err;
  }
  const { tokenizer, transformer } = loaded;
  modelHost.setReady(transformer, tokenizer);
  say(`serving ${modelName} at ${url}/v1${apiKey !== undefined ? ' (API key required)' : ''}; Ctrl-C stops`);
  return {
    app,
    host: modelHost,
    url,
    stop: async () => {
      await app.close();
      await withModel(transformer, {}, async () => undefined); // runs still queued see their clients gone and end
      transformer.dispose();
    },
  };
}

/** How often the server checks that the process that started it is still there. */
const PARENT_POLL_MS = 1000;

/** The parent process id of `pid`, from /proc (Linux); undefined where that cannot be read. */
function parentOf(pid: number): number | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
  } catch {
    return undefined;
  }
}

/** Whether `pid` runs `sh -c ...`, the wrapper npm puts between `npx` and the command. */
function isShellWrapper(pid: number): boolean {
  try {
    const [cmd, flag] = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    return /(^|\/)(ba|da)?sh$/.test(cmd) && flag === '-c';
  } catch {
    return false;
  }
}

/**
 * The processes whose end means the server should end: its parent, and when that parent is npm's
 * `sh -c` wrapper, the process above it too (npx itself: killing it leaves the wrapper waiting).
 * A process started with nohup or by a supervisor is not affected by anything further up.
 */
function watchedAncestors(): number[] {
  const watched = [process.ppid];
  const above = parentOf(process.ppid);
  if (isShellWrapper(process.ppid) && above !== undefined && above > 1) watched.push(above);
  return watched;
}


export async function serveCommand(argv: string[]): Promise<void> {
  const quiet = argv.includes('--quiet');
  // The process that started us (npx, a shell, a supervisor): when it goes, we are reparented.
  const parent = process.ppid;
  const ancestors = watchedAncestors();
  let stopRequested: ((why: string) => void) | null = null;
  const requestStop = (why: string): void => {
    if (stopRequested) stopRequested(why);
    else process.exit(0); // still loading: nothing in flight
  };
  const onSignal = (signal: NodeJS.Signals): void => requestStop(signal);
  const signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
  for (const s of signals) process.on(s, onSignal);
  const poll = setInterval(() => {
    if (process.ppid !== parent || !ancestors.every(isAlive)) requestStop('the parent process is gone');
  }, PARENT_POLL_MS);
  poll.unref();
  try {
    const server = await startServe(argv);
    if (server === undefined) return;
    const why = await new Promise<string>((resolve) => (stopRequested = resolve));
    if (!quiet) process.stderr.write(`stopping (${why})\n`);
    await server.stop();
  } finally {
    clearInterval(poll);
    for (const s of signals) process.off(s, onSignal);
  }
}
