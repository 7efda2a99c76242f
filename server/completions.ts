/**
 * POST /v1/completions: text completion of a prompt (a string, strings, token ids or lists of
 * them), one choice per prompt, streamed as server-sent events with `stream: true`.
 */
import type { FastifyInstance } from 'fastify';
import type { SentencePieceProcessor } from '../tokenizer';
import { badField } from './errors';
import { answerInTurn, checkCommon, checkLength, clientGone, finishReason, generationOptions, newId, now, usageOf, type RouteContext } from './common';
import { runGeneration, type GeneratedToken, type TokenRun } from './run_generation';
import { COMPLETION_SCHEMA, type CompletionBody } from './schemas';
import type { ServedModel } from './model_host';

/** OpenAI's default max_tokens for /v1/completions. */
export const COMPLETION_DEFAULT_MAX_TOKENS = 16;

interface Prompt {
  /** BOS first for text. */
  ids: number[];
  /** The text it stands for (text offsets of logprobs count from its end). */
  text: string;
}

/** The prompts of a completion request as ids and the text each stands for. */
function completionPrompts(sp: SentencePieceProcessor, prompt: CompletionBody['prompt']): Prompt[] {
  const fromText = (text: string): Prompt => ({ ids: sp.encode(text, true), text });
  const fromIds = (ids: number[], where: string): Prompt => {
    const bad = ids.findIndex((id) => id < 0 || id >= sp.vocabSize);
    if (bad >= 0) throw badField('prompt', `Invalid value for '${where}[${bad}]': token id ${ids[bad]} is outside the vocabulary [0, ${sp.vocabSize}).`, 'invalid_value');
    return { ids, text: sp.decode(ids) };
  };
  if (typeof prompt === 'string') return [fromText(prompt)];
  if (prompt.every((p) => typeof p === 'number')) return [fromIds(prompt as number[], 'prompt')];
  return prompt.map((p, i) => {
    if (typeof p === 'string') return fromText(p);
    if (Array.isArray(p)) return fromIds(p, `prompt[${i}]`);
    throw badField('prompt', "Invalid type for 'prompt': expected a string, an array of strings, an array of token ids or an array of arrays of token ids, not a mix.", 'invalid_type');
  });
}

/** OpenAI's completion logprobs for one run: generated tokens up to EOS, offsets into prompt + text. */
function completionLogprobs(model: ServedModel, tokens: readonly GeneratedToken[], offset: number) {
  const shown = tokens.filter((t) => t.id !== model.sp.eosId);
  const textOffset: number[] = [];
  for (const t of shown) {
    textOffset.push(offset);
    offset += t.text.length;
  }
  return {
    tokens: shown.map((t) => model.texts.token(t.id)),
    token_logprobs: shown.map((t) => t.logprob),
    top_logprobs: shown.map((t) => Object.fromEntries((t.top ?? []).map((c) => [model.texts.token(c.id), c.logprob]))),
    text_offset: textOffset,
  };
}

export function registerCompletions(app: FastifyInstance, ctx: RouteContext): void {
  app.post<{ Body: CompletionBody }>('/v1/completions', { schema: { body: COMPLETION_SCHEMA }, config: { usesModel: true } }, async (request, reply) => {
    const body = request.body;
    checkCommon(ctx, body);
    if (body.echo) throw badField('echo', "Invalid value for 'echo': this server does not echo the prompt.", 'unsupported_value');
    if (body.best_of !== undefined && body.best_of !== null && body.best_of !== 1) {
      throw badField('best_of', "Invalid value for 'best_of': this server generates one sequence per prompt, so best_of must be 1.", 'unsupported_value');
    }
    if (body.suffix) throw badField('suffix', "Invalid value for 'suffix': this server does not insert text.", 'unsupported_value');
    const maxTokens = body.max_tokens ?? COMPLETION_DEFAULT_MAX_TOKENS;
    const topLogprobs = body.logprobs ?? undefined;
    // A text far too long is refused now, untokenized (token ids are counted as they are).
    const texts = typeof body.prompt === 'string' ? [body.prompt] : body.prompt.filter((p): p is string => typeof p === 'string');
    for (const text of texts) checkLength(1 + (ctx.host.model?.minTokens(text) ?? 0), maxTokens, 'prompt', true);
    const signal = clientGone(reply);
    const gen = { ...generationOptions(body), maxTokens, topLogprobs, signal };
    const header = { id: newId('cmpl'), object: 'text_completion', created: now(), model: ctx.modelName };

    return answerInTurn(ctx, signal, reply, async (model, openStream) => {
      // Tokenized only now that its turn has come (and not at all if its client left while it waited).
      const prompts = completionPrompts(model.sp, body.prompt);
      for (const p of prompts) checkLength(p.ids.length, maxTokens, 'prompt');

      if (!body.stream) {
        const runs: TokenRun[] = [];
        for (const p of prompts) {
          if (signal.aborted) break; // its client left: the other prompts are not run
          runs.push(await runGeneration(model.transformer, model.sp, p.ids, gen));
        }
        ctx.host.recordUsage(request, usageOf(runs));
        return {
          ...header,
          choices: runs.map((run, index) => ({
            index,
            text: run.completion.text,
            logprobs: topLogprobs === undefined ? null : completionLogprobs(model, run.tokens, prompts[index].text.length),
            finish_reason: finishReason(run.completion.finishReason),
          })),
          usage: usageOf(runs),
        };
      }

      const events = openStream();
      const includeUsage = body.stream_options?.include_usage === true;
      const chunk = (choices: unknown[]) => ({ ...header, choices, ...(includeUsage ? { usage: null } : {}) });
      const runs: TokenRun[] = [];
      try {
        for (const [index, p] of prompts.entries()) {
          if (events.closed || signal.aborted) return undefined;
          let offset = p.text.length;
          let trailing = '';
          const onToken = (t: GeneratedToken): void => {
            if (t.id === model.sp.eosId) {
              trailing += t.text;
              return;
            }
            const logprobs = topLogprobs === undefined ? null : completionLogprobs(model, [t], offset);
            offset += t.text.length;
            events.send(chunk([{ index, text: t.text, logprobs, finish_reason: null }]));
          };
          const run = await runGeneration(model.transformer, model.sp, p.ids, { ...gen, onToken });
          runs.push(run);
          if (events.closed) return undefined;
          events.send(chunk([{ index, text: trailing + run.trailingText, logprobs: null, finish_reason: finishReason(run.completion.finishReason) }]));
        }
        if (includeUsage) events.send({ ...header, choices: [], usage: usageOf(runs) });
        events.end();
      } finally {
        ctx.host.recordUsage(request, usageOf(runs));
      }
      return undefined;
    });
  });
}
