/**
 * The compute pool's faults: a worker terminated in the middle of a product, a pool that cannot
 * start, and no worker left running after close() or after the process ends without it.
 */
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { describe, expect, it } from 'vitest';
import { ComputePool } from '../kernels/pool';

const ROOT = path.join(__dirname, '..');

/** OS threads of this process (Linux), to see that workers' threads are gone. */
function osThreads(): number {
  const m = /^Threads:\s+(\d+)$/m.exec(fs.readFileSync('/proc/self/status', 'utf8'));
  if (m === null) throw new Error('no Threads: line in /proc/self/status');
  return Number(m[1]);
}

/** Waits (briefly) until the thread count falls to `n`: an exited worker's thread is joined soon after. */
async function threadsSettle(n: number): Promise<number> {
  for (let i = 0; i < 50 && osThreads() > n; i++) await new Promise((r) => setTimeout(r, 20));
  return osThreads();
}

function weight(pool: ComputePool, rows: number, cols: number) {
  const h = pool.addWeight('w', rows, cols, 'f32');
  pool.write(h, 0, new Uint8Array(new Float32Array(rows * cols).fill(0.5).buffer));
  return h;
}

describe('compute pool faults', () => {
  it('a worker terminated mid-product fails that call with one line, and every later call; close() still ends', async () => {
    const before = osThreads();
    const pool = await ComputePool.start({ threads: 3 });
    expect(osThreads()).toBeGreaterThan(before);
    const h = weight(pool, 64, 256);
    const x = new Float32Array(256).fill(1);
    expect(pool.matmul(h, x, 1)[0]).toBe(128);
    pool.killWorkerDuringNextCall(2);
    const t0 = Date.now();
    expect(() => pool.matmul(h, x, 1)).toThrow(/^compute pool: worker 2 exited \(code 1\)$/);
    expect(Date.now() - t0).toBeLessThan(10_000);
    expect(() => pool.matmul(h, x, 1)).toThrow(/^compute pool: worker 2 exited/);
    expect(() => pool.addWeight('v', 4, 4, 'f32')).toThrow(/^compute pool: worker 2 exited/);
    await pool.close();
    expect(await threadsSettle(before)).toBeLessThanOrEqual(before);
    expect(() => pool.matmul(h, x, 1)).toThrow(/^compute pool: used after close\(\)$/);
  });

  it('close() after normal use leaves no worker thread; a closed pool can be closed again', async () => {
    const before = osThreads();
    const pool = await ComputePool.start({ threads: 4 });
    const h = weight(pool, 30, 20);
    expect(Array.from(pool.matmul(h, new Float32Array(40).fill(1), 2).slice(0, 2))).toEqual([10, 10]);
    await pool.close();
    await pool.close();
    expect(await threadsSettle(before)).toBeLessThanOrEqual(before);
  });

  it('a pool whose kernels cannot be loaded, or whose worker cannot start, rejects with one line and leaves no thread', async () => {
    const before = osThreads();
    await expect(ComputePool.start({ threads: 2, wasmPath: path.join(ROOT, 'kernels', 'nope.wasm') })).rejects.toThrow(
      /^compute pool: cannot load the kernels from .*nope\.wasm: ENOENT: no such file or directory, open '.*nope\.wasm'$/,
    );
    await expect(ComputePool.start({ threads: 2, wasmPath: path.join(ROOT, 'package.json') })).rejects.toThrow(
      /^compute pool: cannot load the kernels from .*package\.json: WebAssembly\.compile\(\): expected magic word/,
    );
    await expect(ComputePool.start({ threads: 3, failWorkerStart: 2 })).rejects.toThrow(
      /^compute pool: cannot start: worker 2 failed: test hook: worker 2 fails to start$/,
    );
    await expect(ComputePool.start({ threads: 0 })).rejects.toThrow(/^compute pool: threads must be an integer from 1 to 256, got 0$/);
    expect(await threadsSettle(before)).toBeLessThanOrEqual(before);
  });

  it('a process that ends without close() is not kept alive by the workers', () => {
    const script = `
      const { ComputePool } = require(${JSON.stringify(path.join(ROOT, 'kernels', 'pool.ts'))});
      ComputePool.start({ threads: 3 }).then((pool) => {
        const h = pool.addWeight('w', 8, 8, 'f32');
        pool.write(h, 0, new Uint8Array(new Float32Array(64).fill(1).buffer));
        console.log(pool.matmul(h, new Float32Array(8).fill(1), 1)[7]);
      });`;
    const r = spawnSync(process.execPath, ['-r', 'ts-node/register/transpile-only', '-e', script], {
      cwd: ROOT, encoding: 'utf8', timeout: 60_000,
    });
    expect(r.error).toBeUndefined(); // no timeout
    expect(r.stderr).toBe('');
    expect(r.stdout).toBe('8\n');
    expect(r.status).toBe(0);
  });
});
