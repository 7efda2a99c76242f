/**
 * The `serve` command: the model behind an OpenAI-compatible REST API (server/app.ts), as Mistral's
 * deployment docs serve it, so that any OpenAI client library can call it.
 *
 *   one_file_ref.ts serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY]
 *       [--model-name NAME] [--max-body-bytes N]
 *
 * Runs until SIGINT or SIGTERM, then stops taking requests, ends those in flight and exits 0.
 */
import * as path from 'path';
import type { FastifyInstance } from 'fastify';
import { withModel } from '../generation/generate';
import { buildServer, DEFAULT_BODY_LIMIT, serverUrl } from '../server/app';
import { COMMON_HELP, modelPath, parseCommandLine, parseIntFlag, UsageError, type OptionSpec } from './args';
import { loadForCommand } from './load';

export const SERVE_HELP = `  npx ts-node one_file_ref.ts serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                      [--model-name NAME] [--max-body-bytes N]
      An OpenAI-compatible REST API: GET /v1/models, POST /v1/completions, POST
      /v1/chat/completions (the Mistral-7B-Instruct template), GET /health. Requests take turns
      on the model in the order they come; stream: true sends one event per token.
      --host HOST          address to listen on (default 127.0.0.1: this machine only)
      --port N             port (default 8000; 0 picks a free one)
      --api-key KEY        require "Authorization: Bearer KEY" on /v1 (default: none; also
                           MISTRAL_API_KEY=KEY)
      --model-name NAME    the model id clients send (default: MODEL's folder name)
      --max-body-bytes N   larger request bodies get 413 (default ${DEFAULT_BODY_LIMIT})
`;

const OPTIONS = {
  host: { type: 'string' },
  port: { type: 'string' },
  'api-key': { type: 'string' },
  'model-name': { type: 'string' },
  'max-body-bytes': { type: 'string' },
} as const satisfies OptionSpec;

/** The model id of a model path: its folder's name, or a .tar's name without the extension. */
export function defaultModelName(model: string): string {
  return path.basename(path.resolve(model)).replace(/\.tar$/i, '');
}

/** A server started by startServe(): where it listens, and how to stop it and free its model. */
export interface RunningServer {
  app: FastifyInstance;
  /** http://HOST:PORT */
  url: string;
  /** Stops taking requests, ends those in flight (their clients see the connection close) and disposes the model. */
  stop(): Promise<void>;
}

/** Parses the command line, loads the model and listens; undefined after printing --help. */
export async function startServe(argv: string[]): Promise<RunningServer | undefined> {
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
  const apiKey = values['api-key'] ?? process.env.MISTRAL_API_KEY;
  if (apiKey !== undefined && apiKey.trim() === '') throw new UsageError('--api-key must not be empty');
  const modelName = values['model-name'] ?? defaultModelName(model);
  if (modelName.trim() === '') throw new UsageError('--model-name must not be empty');

  const { tokenizer, transformer } = await loadForCommand(model, values, 1);
  const app = buildServer({ transformer, tokenizer, modelName, apiKey, bodyLimit });
  try {
    await app.listen({ host, port });
  } catch (err) {
    transformer.dispose();
    const e = err as NodeJS.ErrnoException;
    if (e.code === 'EADDRINUSE') throw new UsageError(`--port ${port}: the address ${host}:${port} is already in use`);
    if (e.code === 'EADDRNOTAVAIL' || e.code === 'ENOTFOUND') throw new UsageError(`--host ${host}: not an address of this machine`);
    throw err;
  }
  const url = serverUrl(app);
  if (!values.quiet) process.stderr.write(`serving ${modelName} at ${url}/v1${apiKey !== undefined ? ' (API key required)' : ''}; Ctrl-C stops\n`);
  return {
    app,
    url,
    stop: async () => {
      await app.close();
      await withModel(transformer, {}, async () => undefined); // runs still queued see their clients gone and end
      transformer.dispose();
    },
  };
}

export async function serveCommand(argv: string[]): Promise<void> {
  const server = await startServe(argv);
  if (server === undefined) return;
  const quiet = argv.includes('--quiet');
  await new Promise<void>((resolve) => {
    const stop = (): void => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      if (!quiet) process.stderr.write('stopping\n');
      resolve();
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
  await server.stop();
}
