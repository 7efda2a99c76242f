/**
 * The note a first run prints on a machine where the native backends did not install.
 *
 * `@tensorflow/tfjs-node` and `-node-gpu` are optionalDependencies: their install step downloads
 * libtensorflow, and where that fails npm drops them without a word, so the model runs on wasm
 * (several times slower than native on many cores, and held to 4 GiB). The first model command on
 * such a machine says so once, on stderr, and how to get the native backend; a marker file in the
 * user's cache folder keeps it from saying it again. Silent with --quiet, --backend NAME or
 * MISTRAL_BACKEND (a backend chosen on purpose), in CI (CI set) and with MISTRAL_NO_BACKEND_NOTE=1.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

/** Whether either native backend package is installed (resolvable; it is not loaded here). */
export function nativeBackendInstalled(): boolean {
  for (const name of ['@tensorflow/tfjs-node', '@tensorflow/tfjs-node-gpu']) {
    try {
      require.resolve(name);
      return true;
    } catch {
      // not installed
    }
  }
  return false;
}

/** The marker's path: $XDG_CACHE_HOME, else the OS's cache folder, then mistral-ts-ref/. */
export function backendNoteMarker(env: NodeJS.ProcessEnv = process.env): string {
  const home = os.homedir();
  const cache =
    env.XDG_CACHE_HOME ||
    (process.platform === 'darwin'
      ? path.join(home, 'Library', 'Caches')
      : process.platform === 'win32'
        ? env.LOCALAPPDATA || path.join(home, 'AppData', 'Local')
        : path.join(home, '.cache'));
  return path.join(cache, 'mistral-ts-ref', 'native-backend-note-shown');
}

export const BACKEND_NOTE =
  'note: the model runs on the wasm backend (WebAssembly, one thread, 4 GiB at most): the native ' +
  'backends @tensorflow/tfjs-node (CPU) and @tensorflow/tfjs-node-gpu (CUDA) are optional dependencies ' +
  'whose install downloads libtensorflow, which did not happen on this machine.\n' +
  'note: for the native CPU backend run `npm install @tensorflow/tfjs-node` where storage.googleapis.com ' +
  'can be reached (see the README, "Running the real Mistral-7B-v0.1"). Shown once (marker: MARKER).\n';

/**
 * Prints the note on stderr when a model command is about to run on a machine without the native
 * backends, the first time only; `argv` is the command's flags (for --quiet and --backend).
 */
export function maybeNoteBackend(argv: string[], env: NodeJS.ProcessEnv = process.env): void {
  if (argv.includes('--quiet') || argv.some((a) => a === '--backend' || a.startsWith('--backend='))) return;
  if (env.MISTRAL_BACKEND || env.CI || env.MISTRAL_NO_BACKEND_NOTE) return;
  if (nativeBackendInstalled()) return;
  const marker = backendNoteMarker(env);
  if (fs.existsSync(marker)) return;
  try {
    fs.mkdirSync(path.dirname(marker), { recursive: true });
    fs.writeFileSync(marker, `${new Date().toISOString()}\n`);
  } catch {
    return; // no writable cache folder: better no note than the same note on every run
  }
  process.stderr.write(BACKEND_NOTE.replace('MARKER', marker));
}
