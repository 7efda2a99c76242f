/**
 * `perplexity` against an independent computation: Python (numpy and sentencepiece, not the port)
 * tokenizes the text with BOS, cuts it into llama.cpp's windows (floor(n/ctx) windows, first token
 * set to BOS), and from the logits the port's `logits` command gives for those windows computes
 * llama.cpp's numbers: PPL = exp(mean nll) over the second halves (positions ctx/2 .. ctx-2), its
 * standard error, the running value per window, and against a second model (the tiny model as a
 * Q8_0 GGUF) the mean KL(base || new), the top-1 agreement and the perplexity ratio. The port's
 * `perplexity --json` (with --save-logits, then --kl-divergence) must give the same figures.
 */
import { execFileSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { perplexityWindows } from '../cli/perplexity';
import { runCommand } from './run_command';

const ROOT = path.resolve(__dirname, '..');
const TINY = path.join(ROOT, 'fixtures', 'tiny');
const PYTHON = '/usr/bin/python3';
const CTX = 16;

let dir: string;
let textFile: string;
let q8: string;

const PY_WINDOWS = String.raw`
import sys, json
from sentencepiece import SentencePieceProcessor
sp = SentencePieceProcessor(model_file=sys.argv[1])
text = open(sys.argv[2], encoding='utf-8').read()
ctx = int(sys.argv[3])
tokens = [sp.bos_id()] + sp.encode(text)
windows = []
for i in range(len(tokens) // ctx):
    w = tokens[i * ctx:(i + 1) * ctx]
    w[0] = sp.bos_id()
    windows.append(w)
print(json.dumps({'tokens': tokens, 'windows': windows}))
`;

const PY_SCORE = String.raw`
import sys, json
import numpy as np
tokens = json.load(open(sys.argv[1]))['tokens']
ctx = int(sys.argv[2])
def logprobs(file):
    z = np.load(file).astype(np.float64)              # [windows, ctx, V]
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
first = ctx // 2
def scored(lp):
    rows, targets = [], []
    for i in range(lp.shape[0]):
        for j in range(first, ctx - 1):
            rows.append(lp[i, j]); targets.append(tokens[i * ctx + j + 1])
    return np.array(rows), np.array(targets)
def ppl_of(lp):
    rows, t = scored(lp)
    nll = -rows[np.arange(len(t)), t]
    mean = nll.mean(); ppl = np.exp(mean)
    var = (nll ** 2).mean() - mean ** 2
    per = (ctx - 1 - first)
    running = [float(np.exp(nll[:per * (k + 1)].mean())) for k in range(lp.shape[0])]
    return float(ppl), float(ppl * np.sqrt(var / (len(nll) - 1))), running, len(nll), rows
base = logprobs(sys.argv[3]); new = logprobs(sys.argv[4])
pb, sb, rb, n, rows_b = ppl_of(base)
pn, sn, rn, _, rows_n = ppl_of(new)
kl = (np.exp(rows_b) * (rows_b - rows_n)).sum(axis=1)
top1 = float((rows_b.argmax(axis=1) == rows_n.argmax(axis=1)).mean())
# top-k base (k = 32): the top-k terms and one term for the rest of the mass, a lower bound of KL
k = 32
order = np.argsort(-rows_b, axis=1, kind='stable')[:, :k]
lb = np.take_along_axis(rows_b, order, 1); ln = np.take_along_axis(rows_n, order, 1)
rest_b = np.maximum(1 - np.exp(lb).sum(1), 1e-30); rest_n = np.maximum(1 - np.exp(ln).sum(1), 1e-30)
kl_topk = np.maximum((np.exp(lb) * (lb - ln)).sum(1) + rest_b * np.log(rest_b / rest_n), 0)
print(json.dumps({'ppl': pb, 'stderr': sb, 'running': rb, 'scored': n, 'ppl_new': pn, 'stderr_new': sn,
                  'mean_kl': float(np.maximum(kl, 0).mean()), 'kl_stderr': float(np.maximum(kl, 0).std(ddof=1) / np.sqrt(n)),
                  'top1': top1, 'ratio': pn / pb, 'mean_kl_topk': float(kl_topk.mean())}))
`;

interface PplJson {
  ctx: number;
  text_tokens: number;
  windows: number;
  scored_tokens: number;
  ppl: number;
  ppl_stderr: number;
  per_window: number[];
  tokens_per_second: number;
  kl_divergence?: { mean_kl: number; kl_stderr: number; top1_agreement: number; ppl_ratio: number; ppl_base: number; base_kind: string };
}

let expected: {
  ppl: number; stderr: number; running: number[]; scored: number; ppl_new: number; stderr_new: number;
  mean_kl: number; kl_stderr: number; top1: number; ratio: number; mean_kl_topk: number;
};
let tokens: number[];
let windows: number[][];

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ppl-test-'));
  // The first 3 stories of the storyteller's held-out text: ~300 tiny-tokenizer tokens.
  const lines = fs.readFileSync(path.join(ROOT, 'fixtures', 'storyteller_heldout.txt'), 'utf8').split('\n').slice(0, 3);
  textFile = path.join(dir, 'text.txt');
  fs.writeFileSync(textFile, `${lines.join('\n')}\n`);
  q8 = path.join(dir, 'tiny-q8_0.gguf');
  await runCommand(['convert', TINY, '--out', q8, '--type', 'q8_0', '--quiet']);

  const win = execFileSync(PYTHON, ['-c', PY_WINDOWS, path.join(TINY, 'tokenizer.model'), textFile, String(CTX)], { encoding: 'utf8' });
  fs.writeFileSync(path.join(dir, 'windows.json'), win);
  ({ tokens, windows } = JSON.parse(win) as { tokens: number[]; windows: number[][] });
  const rows = windows.flatMap((w) => ['--tokens', w.join(',')]);
  await runCommand(['logits', TINY, ...rows, '--out', path.join(dir, 'base.npy'), '--quiet']);
  await runCommand(['logits', q8, ...rows, '--out', path.join(dir, 'q8.npy'), '--quiet']);
  expected = JSON.parse(
    execFileSync(PYTHON, ['-c', PY_SCORE, path.join(dir, 'windows.json'), String(CTX), path.join(dir, 'base.npy'), path.join(dir, 'q8.npy')], { encoding: 'utf8' }),
  );
});

afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

const close = (a: number, b: number, rel = 1e-5): void => {
  expect(Math.abs(a - b)).toBeLessThanOrEqual(rel * Math.abs(b) + 1e-9);
};

describe('perplexity as llama.cpp computes it', () => {
  it('windows: floor(n/ctx) of ctx tokens, BOS first, the tail dropped', () => {
    expect(windows.length).toBeGreaterThan(10);
    expect(perplexityWindows(tokens, CTX, 1)).toEqual(windows);
    expect(perplexityWindows([1, 5, 6, 7, 8, 9, 10], 3, 1)).toEqual([[1, 5, 6], [1, 8, 9]]);
  });

  it('the perplexity, its standard error and the running values equal numpy\'s from the logits command', async () => {
    const { stdout } = await runCommand(['perplexity', TINY, '--file', textFile, '--ctx', String(CTX), '--json', '--save-logits', path.join(dir, 'saved.json')]);
    const r = JSON.parse(stdout) as PplJson;
    expect(r.text_tokens).toBe(tokens.length);
    expect(r.windows).toBe(windows.length);
    expect(r.scored_tokens).toBe(expected.scored);
    expect(r.scored_tokens).toBe(windows.length * (CTX - 1 - CTX / 2));
    close(r.ppl, expected.ppl);
    close(r.ppl_stderr, expected.stderr, 1e-4);
    r.per_window.forEach((v, i) => close(v, expected.running[i]));
    expect(r.tokens_per_second).toBeGreaterThan(0);
    // The tiny model is random: its perplexity is near its vocabulary size, not near 1.
    expect(r.ppl).toBeGreaterThan(100);
  });

  it('--kl-divergence against the saved run: KL, top-1 agreement and ratio as numpy computes them (Q8_0 GGUF)', async () => {
    const { stdout } = await runCommand(['perplexity', q8, '--file', textFile, '--ctx', String(CTX), '--json', '--kl-divergence', path.join(dir, 'saved.json')]);
    const r = JSON.parse(stdout) as PplJson;
    close(r.ppl, expected.ppl_new);
    const kl = r.kl_divergence!;
    expect(kl.base_kind).toBe('full');
    close(kl.mean_kl, expected.mean_kl, 1e-3);
    close(kl.kl_stderr, expected.kl_stderr, 1e-2);
    expect(kl.mean_kl).toBeGreaterThan(0);
    expect(kl.top1_agreement).toBeCloseTo(expected.top1, 10);
    close(kl.ppl_ratio, expected.ratio);
    close(kl.ppl_base, expected.ppl);
  });

  it('the same model against itself: KL 0, agreement 100%, ratio 1 (text output)', async () => {
    const before = tf.memory().numTensors;
    const { stdout, stderr } = await runCommand(['perplexity', TINY, '--file', textFile, '--ctx', String(CTX), '--kl-divergence', path.join(dir, 'saved.json')]);
    expect(tf.memory().numTensors).toBe(before);
    expect(stdout).toMatch(/^Final estimate: PPL = \d+\.\d{4} \+\/- \d+\.\d{5}\n/);
    expect(stdout).toContain('Mean KL divergence vs');
    expect(stdout).toMatch(/: 0\.000000 \+\/- 0\.000000/);
    expect(stdout).toContain('Top-1 agreement: 100.00%');
    expect(stdout).toContain('PPL ratio: 1.000000');
    expect(stderr.split('\n').filter((l) => /^\[\d+\/\d+\] \d+\.\d{4}$/.test(l)).length).toBe(windows.length);
  });

  it('a top-k base (large vocabularies): the top-32 bound numpy computes, below the full KL', async () => {
    process.env.MISTRAL_PERPLEXITY_FULL_VOCAB = '0';
    try {
      await runCommand(['perplexity', TINY, '--file', textFile, '--ctx', String(CTX), '--json', '--save-logits', path.join(dir, 'topk.json'), '--quiet']);
    } finally {
      delete process.env.MISTRAL_PERPLEXITY_FULL_VOCAB;
    }
    const saved = JSON.parse(fs.readFileSync(path.join(dir, 'topk.json'), 'utf8')) as { kind: string; k: number };
    expect([saved.kind, saved.k]).toEqual(['top-k', 32]);
    const { stdout } = await runCommand(['perplexity', q8, '--file', textFile, '--ctx', String(CTX), '--json', '--kl-divergence', path.join(dir, 'topk.json')]);
    const kl = (JSON.parse(stdout) as PplJson).kl_divergence!;
    expect(kl.base_kind).toBe('top-k');
    close(kl.mean_kl, expected.mean_kl_topk, 1e-3);
    expect(kl.mean_kl).toBeLessThanOrEqual(expected.mean_kl * (1 + 1e-6));
    expect(kl.top1_agreement).toBeCloseTo(expected.top1, 10);
  });
});

describe('perplexity: bad input', () => {
  const fails = async (argv: string[], pattern: RegExp): Promise<void> => {
    await expect(runCommand(argv)).rejects.toThrow(pattern);
  };
  it('a text shorter than one window', async () => {
    await fails(['perplexity', TINY, '--file', textFile, '--ctx', '100000', '--quiet'], /--file .*text\.txt: \d+ tokens, fewer than one window of --ctx 100000/);
  });
  it('--ctx below 4, a missing --file, an unreadable file', async () => {
    await fails(['perplexity', TINY, '--file', textFile, '--ctx', '2'], /^--ctx must be an integer >= 4, got "2"$/);
    await fails(['perplexity', TINY], /^perplexity needs --file TEXT$/);
    await fails(['perplexity', TINY, '--file', path.join(dir, 'nope.txt')], /--file .*nope\.txt: cannot read \(no such file\)$/);
  });
  it('a --kl-divergence base that is not one, or from another run', async () => {
    const junk = path.join(dir, 'junk.json');
    fs.writeFileSync(junk, '{"a": 1}');
    await fails(['perplexity', TINY, '--file', textFile, '--ctx', String(CTX), '--kl-divergence', junk], /junk\.json: not a file written by perplexity --save-logits$/);
    fs.writeFileSync(junk, 'not json');
    await fails(['perplexity', TINY, '--file', textFile, '--ctx', String(CTX), '--kl-divergence', junk], /junk\.json: not JSON/);
    await fails(
      ['perplexity', TINY, '--file', textFile, '--ctx', '32', '--kl-divergence', path.join(dir, 'saved.json'), '--quiet'],
      /saved\.json: saved for ctx 16, vocabulary 512, \d+ scored tokens; this run has ctx 32/,
    );
  });
  it('--save-logits of more tokens than one JSON file holds: an error before any window runs', async () => {
    process.env.MISTRAL_PERPLEXITY_SAVE_LIMIT = '10000';
    try {
      // The tiny model's full distributions: 512 values a scored token, 2,731 characters of base64 each, so 3 fit in 10,000.
      await fails(
        ['perplexity', TINY, '--file', textFile, '--ctx', String(CTX), '--save-logits', path.join(dir, 'big.json')],
        /^--save-logits .*big\.json: \d+ scored tokens x 512 values would take \d+ characters, more than the 10000 one file holds; give a shorter --file \(at most 3 scored tokens\)$/,
      );
    } finally {
      delete process.env.MISTRAL_PERPLEXITY_SAVE_LIMIT;
    }
    expect(fs.existsSync(path.join(dir, 'big.json'))).toBe(false);
  });
  it('--save-logits into a folder that does not exist', async () => {
    await fails(['perplexity', TINY, '--file', textFile, '--save-logits', path.join(dir, 'no', 'x.json')], /--save-logits .*: folder .* does not exist$/);
  });
});
