/**
 * The direction of imports (README "Layout"): the model file imports model/, checkpoint/,
 * tokenizer/ and runtime/; the commands (cli/, generation/, server/) sit above it; nothing below
 * imports what sits above it, and no file reaches itself through its imports.
 *
 * Imports are read with TypeScript's own pre-processor (static `import`/`export ... from` and
 * `require('literal')`). one_file_ref.ts's script hook requires cli/main by a path computed at run
 * time, deliberately outside this graph: the model does not depend on the commands.
 */
import * as fs from 'fs';
import * as path from 'path';
import ts from 'typescript';
import { describe, expect, it } from 'vitest';

const ROOT = path.resolve(__dirname, '..');
const SKIP = new Set(['node_modules', 'test', '.git', 'fixtures']);

function sources(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    if (e.isDirectory()) return SKIP.has(e.name) ? [] : sources(path.join(dir, e.name));
    return e.name.endsWith('.ts') && !e.name.endsWith('.d.ts') ? [path.join(dir, e.name)] : [];
  });
}

function resolveImport(from: string, spec: string): string | null {
  if (!spec.startsWith('.')) return null; // a package
  const base = path.resolve(path.dirname(from), spec);
  if (/\.(c|m)?js$/.test(base) && fs.existsSync(base)) return null; // a plain JavaScript file (kernels/' worker code), not in the .ts graph
  for (const candidate of [base, `${base}.ts`, path.join(base, 'index.ts')]) {
    if (candidate.endsWith('.ts') && fs.existsSync(candidate) && fs.statSync(candidate).isFile()) return candidate;
  }
  throw new Error(`${path.relative(ROOT, from)}: cannot resolve import "${spec}"`);
}

/** Each project .ts file (outside test/) and the project files it imports. */
function importGraph(): Map<string, string[]> {
  const graph = new Map<string, string[]>();
  for (const file of sources(ROOT)) {
    const info = ts.preProcessFile(fs.readFileSync(file, 'utf8'), true, true);
    const targets = info.importedFiles.map((f) => resolveImport(file, f.fileName)).filter((t): t is string => t !== null);
    graph.set(path.relative(ROOT, file), [...new Set(targets.map((t) => path.relative(ROOT, t)))]);
  }
  return graph;
}

/** The first import circle found, as a list of files ending where it starts; null when there is none. */
function findCircle(graph: Map<string, string[]>): string[] | null {
  const state = new Map<string, 'open' | 'done'>();
  const stack: string[] = [];
  const visit = (file: string): string[] | null => {
    state.set(file, 'open');
    stack.push(file);
    for (const next of graph.get(file) ?? []) {
      if (state.get(next) === 'open') return [...stack.slice(stack.indexOf(next)), next];
      if (state.get(next) === undefined) {
        const found = visit(next);
        if (found) return found;
      }
    }
    stack.pop();
    state.set(file, 'done');
    return null;
  };
  for (const file of [...graph.keys()].sort()) {
    if (state.get(file) === undefined) {
      const found = visit(file);
      if (found) return found;
    }
  }
  return null;
}

describe('imports', () => {
  const graph = importGraph();

  it('reads the project: one_file_ref.ts imports model/ and cli/ imports one_file_ref.ts', () => {
    expect(graph.get('one_file_ref.ts')).toContain(path.join('model', 'weights.ts'));
    expect(graph.get(path.join('cli', 'logits.ts'))).toContain('one_file_ref.ts');
    expect(graph.size).toBeGreaterThan(40);
  });

  it('the circle finder names a circle when there is one', () => {
    const g = new Map([['a.ts', ['b.ts']], ['b.ts', ['c.ts']], ['c.ts', ['a.ts', 'd.ts']], ['d.ts', []]]);
    expect(findCircle(g)).toEqual(['a.ts', 'b.ts', 'c.ts', 'a.ts']);
    expect(findCircle(new Map([['a.ts', ['b.ts']], ['b.ts', []]]))).toBeNull();
  });

  it('has no import circle among the .ts files outside test/', () => {
    const circle = findCircle(graph);
    expect(circle === null ? 'no circle' : `import circle: ${circle.join(' -> ')}`).toBe('no circle');
  });

  it('nothing under checkpoint/, tokenizer/, runtime/, kernels/ or model/ imports one_file_ref.ts, cli/, server/ or generation/', () => {
    const below = ['checkpoint', 'tokenizer', 'runtime', 'kernels', 'model'];
    const above = (f: string): boolean => f === 'one_file_ref.ts' || ['cli', 'server', 'generation'].includes(f.split(path.sep)[0]);
    const wrong = [...graph].flatMap(([file, targets]) =>
      below.includes(file.split(path.sep)[0]) ? targets.filter(above).map((t) => `${file} imports ${t}`) : [],
    );
    expect(wrong).toEqual([]);
    expect([...graph.keys()].filter((f) => f.startsWith(`model${path.sep}`)).length).toBeGreaterThanOrEqual(4);
  });

  it("one_file_ref.ts does not import cli/ (its script hook hands over at run time)", () => {
    const text = fs.readFileSync(path.join(ROOT, 'one_file_ref.ts'), 'utf8');
    expect(text.match(/require\('\.\/cli|from '\.\/cli/g)).toBeNull();
    expect((graph.get('one_file_ref.ts') ?? []).filter((t) => t.startsWith(`cli${path.sep}`))).toEqual([]);
  });
});
