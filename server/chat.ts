/**
 * POST /v1/chat/completions: the messages through Mistral-7B-Instruct-v0.1's template
 * (tokenizer/instruct.ts), the answer decoded on its own, streamed as server-sent events with
 * `stream: true`.
 */
import type { FastifyInstance } from 'fastify';
import { MAX_POSITIONS } from '../one_file_ref';
import type { SentencePieceProcessor } from '../tokenizer';
import { encodeInstruct, type ChatMessage } from '../tokenizer/instruct';
import { TokenizerError } from '../tokenizer/error';
import { badField } from './errors';
import { answerInTurn, checkCommon, checkLength, clientGone, finishReason, generationOptions, newId, now, usageOf, type RouteContext } from './common';
import { runGeneration, type GeneratedToken, type TokenRun } from './run_generation';
import { CHAT_SCHEMA, type ChatBody } from './schemas';
import type { ServedModel } from './model_host';

/** The conversation as the Instruct template's ids; a bad role order is a 400 naming the message. */
function chatPromptIds(sp: SentencePieceProcessor, messages: ChatBody['messages']): number[] {
  const converted: ChatMessage[] = messages.map((m) => ({
    role: m.role === 'developer' ? 'system' : m.role,
    content: typeof m.content === 'string' ? m.content : m.content.map((part) => part.text).join(''),
  }));
  try {
    return encodeInstruct(sp, converted);
  } catch (err) {
    if (err instanceof TokenizerError) throw badField('messages', err.message, 'invalid_value');
    throw err;
  }
}

/** One entry of a chat response's logprobs.content. */
const chatLogprob = (model: ServedModel, t: GeneratedToken) => ({
  token: model.texts.token(t.id),
  logprob: t.logprob,
  bytes: model.texts.bytes(t.id),
  top_logprobs: (t.top ?? []).map((c) => ({ token: model.texts.token(c.id), logprob: c.logprob, bytes: model.texts.bytes(c.id) })),
});

export function registerChat(app: FastifyInstance, ctx: RouteContext): void {
  app.post<{ Body: ChatBody }>('/v1/chat/completions', { schema: { body: CHAT_SCHEMA }, config: { usesModel: true } }, async (request, reply) => {
    const body = request.body;
    checkCommon(ctx, body);
    const wantLogprobs = body.logprobs === true;
    if (!wantLogprobs && body.top_logprobs !== undefined && body.top_logprobs !== null) {
      throw badField('top_logprobs', "Invalid value for 'top_logprobs': it needs 'logprobs' set to true.", 'invalid_value');
    }
    const topLogprobs = wantLogprobs ? body.top_logprobs ?? 0 : undefined;
    // A conversation far too long is refused now, untokenized.
    const contents = body.messages.map((m) => (typeof m.content === 'string' ? m.content : m.content.map((part) => part.text).join('')));
    const leastTokens = contents.reduce((n, text) => n + (ctx.host.model?.minTokens(text) ?? 0), 1);
    checkLength(leastTokens, body.max_completion_tokens ?? body.max_tokens ?? 0, 'messages', true);
    const signal = clientGone(reply);
    const header = { id: newId('chatcmpl'), object: 'chat.completion', created: now(), model: ctx.modelName, system_fingerprint: null };

    return answerInTurn(ctx, signal, reply, async (model, openStream) => {
      // Tokenized only now that its turn has come (and not at all if its client left while it waited).
      const promptIds = chatPromptIds(model.sp, body.messages);
      const maxTokens = body.max_completion_tokens ?? body.max_tokens ?? Math.max(0, MAX_POSITIONS - promptIds.length);
      checkLength(promptIds.length, maxTokens, 'messages');
      // The answer is decoded on its own, as chat.ts does (mistral-common encodes an assistant message
      // alone): its first piece's dummy-prefix space is not part of the text.
      const gen = { ...generationOptions(body), maxTokens, topLogprobs, signal, context: [] };
      const shown = (tokens: readonly GeneratedToken[]) => tokens.filter((t) => t.id !== model.sp.eosId).map((t) => chatLogprob(model, t));

      if (!body.stream) {
        const run = await runGeneration(model.transformer, model.sp, promptIds, gen);
        ctx.host.recordUsage(request, usageOf([run]));
        return {
          ...header,
          choices: [
            {
              index: 0,
              message: { role: 'assistant', content: run.completion.text, refusal: null },
              logprobs: wantLogprobs ? { content: shown(run.tokens), refusal: null } : null,
              finish_reason: finishReason(run.completion.finishReason),
            },
          ],
          usage: usageOf([run]),
        };
      }

      const events = openStream();
      const includeUsage = body.stream_options?.include_usage === true;
      const chunk = (choice: Record<string, unknown>) => ({
        ...header,
        object: 'chat.completion.chunk',
        choices: [{ index: 0, logprobs: null, finish_reason: null, ...choice }],
        ...(includeUsage ? { usage: null } : {}),
      });
      const runs: TokenRun[] = [];
      try {
        events.send(chunk({ delta: { role: 'assistant', content: '' } }));
        let trailing = '';
        const onToken = (t: GeneratedToken): void => {
          if (t.id === model.sp.eosId) {
            trailing += t.text;
            return;
          }
          events.send(chunk({ delta: { content: t.text }, logprobs: wantLogprobs ? { content: [chatLogprob(model, t)], refusal: null } : null }));
        };
        const run = await runGeneration(model.transformer, model.sp, promptIds, { ...gen, onToken });
        runs.push(run);
        if (events.closed) return undefined;
        const rest = trailing + run.trailingText;
        events.send(chunk({ delta: rest === '' ? {} : { content: rest }, finish_reason: finishReason(run.completion.finishReason) }));
        if (includeUsage) events.send({ ...header, object: 'chat.completion.chunk', choices: [], usage: usageOf(runs) });
        events.end();
      } finally {
        ctx.host.recordUsage(request, usageOf(runs));
      }
      return undefined;
    });
  });
}
