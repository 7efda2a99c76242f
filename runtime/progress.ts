/**
 * Progress of a long load on stderr: a bar redrawn in place (bytes, rate, ETA) when stderr is a
 * terminal, a single summary line when it is not (logs, CI), nothing when quiet.
 */

export interface Progress {
  /** Records that `done` of `total` bytes are loaded. */
  update(done: number, total: number): void;
  /** Ends the bar (or prints the summary line). */
  finish(): void;
}

export interface ProgressOptions {
  quiet?: boolean;
  /** Defaults to process.stderr. */
  stream?: NodeJS.WriteStream;
  /** Milliseconds between redraws on a terminal. */
  intervalMs?: number;
}

export function formatBytes(n: number): string {
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

function formatSeconds(s: number): string {
  if (!Number.isFinite(s)) return '--';
  if (s < 60) return `${s.toFixed(0)}s`;
  return `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, '0')}s`;
}

export function createProgress(label: string, opts: ProgressOptions = {}): Progress {
  const stream = opts.stream ?? process.stderr;
  const start = Date.now();
  let last = 0;
  let done = 0;
  let total = 0;
  const interactive = stream.isTTY === true;
  const draw = (): void => {
    const elapsed = (Date.now() - start) / 1000;
    const rate = elapsed > 0 ? done / elapsed : 0;
    const eta = rate > 0 ? (total - done) / rate : Infinity;
    const frac = total > 0 ? Math.min(1, done / total) : 0;
    const width = 24;
    const bar = '#'.repeat(Math.round(frac * width)).padEnd(width, '.');
    stream.write(
      `\r${label} [${bar}] ${formatBytes(done)} / ${formatBytes(total)}  ${formatBytes(rate)}/s  ETA ${formatSeconds(eta)}\x1b[K`,
    );
  };
  return {
    update(d: number, t: number): void {
      done = d;
      total = t;
      if (opts.quiet || !interactive) return;
      const now = Date.now();
      if (now - last >= (opts.intervalMs ?? 100) || d >= t) {
        last = now;
        draw();
      }
    },
    finish(): void {
      if (opts.quiet) return;
      const elapsed = (Date.now() - start) / 1000;
      if (interactive) {
        draw();
        stream.write('\n');
      } else {
        const rate = elapsed > 0 ? done / elapsed : 0;
        stream.write(`${label}: ${formatBytes(done)} in ${elapsed.toFixed(1)} s (${formatBytes(rate)}/s)\n`);
      }
    },
  };
}
