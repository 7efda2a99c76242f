/** The loading progress on stderr: a bar on a terminal, one summary line otherwise, nothing when quiet. */
import { describe, expect, it } from 'vitest';
import { createProgress, formatBytes } from '../runtime/progress';

function fakeStream(isTTY: boolean): NodeJS.WriteStream & { text: string } {
  const stream = { isTTY, text: '', write(s: string) { stream.text += s; return true; } };
  return stream as unknown as NodeJS.WriteStream & { text: string };
}

describe('progress', () => {
  it('draws a bar with bytes, rate and ETA on a terminal, redrawn in place', () => {
    const stream = fakeStream(true);
    const p = createProgress('loading weights', { stream, intervalMs: 0 });
    p.update(250_000_000, 1_000_000_000);
    p.update(1_000_000_000, 1_000_000_000);
    p.finish();
    const frames = stream.text.split('\r').filter((f) => f !== '');
    expect(frames[0]).toMatch(/^loading weights \[######\.{18}\] 250\.0 MB \/ 1\.0 GB .*\/s\s+ETA \S+/);
    expect(frames.at(-1)).toMatch(/\[#{24}\] 1\.0 GB \/ 1\.0 GB .*\n$/);
    expect(stream.text.endsWith('\n')).toBe(true);
  });

  it('prints one summary line when stderr is not a terminal', () => {
    const stream = fakeStream(false);
    const p = createProgress('loading weights', { stream });
    for (let i = 1; i <= 100; i++) p.update(i * 1e6, 100e6);
    p.finish();
    expect(stream.text).toMatch(/^loading weights: 100\.0 MB in [\d.]+ s \([\d.]+ [kMG]?B\/s\)\n$/);
  });

  it('prints nothing with --quiet', () => {
    const stream = fakeStream(true);
    const p = createProgress('loading weights', { stream, quiet: true });
    p.update(1, 2);
    p.finish();
    expect(stream.text).toBe('');
  });

  it('formats bytes in SI units', () => {
    expect(formatBytes(999)).toBe('999 B');
    expect(formatBytes(14_483_558_611)).toBe('14.5 GB');
  });
});
