/**
 * The request bodies of the OpenAI-compatible endpoints: JSON schemas that fastify's ajv checks
 * before a handler runs (a missing or wrongly typed field is a 400 naming it), and the TypeScript
 * types of the bodies that pass them.
 *
 * Fields follow OpenAI's API reference for /v1/completions and /v1/chat/completions. Fields this
 * server does not know are allowed and ignored, as OpenAI's own clients may send newer ones; `user`
 * is known and ignored. Values that the schema cannot express (n must be 1, top_logprobs needs
 * logprobs) are checked by the handlers.
 */

/** A field that may also be null, as OpenAI's clients send unset optional fields. */
const nullable = (schema: Record<string, unknown>): Record<string, unknown> => {
  const type = schema.type;
  return { ...schema, type: Array.isArray(type) ? [...type, 'null'] : [type, 'null'] };
};

/** Fields both endpoints share. */
const COMMON_FIELDS = {
  model: { type: 'string' },
  max_tokens: nullable({ type: 'integer', minimum: 0 }),
  temperature: nullable({ type: 'number', minimum: 0, maximum: 2 }),
  top_p: nullable({ type: 'number', minimum: 0, maximum: 1 }),
  seed: nullable({ type: 'integer' }),
  stop: { type: ['string', 'array', 'null'], minLength: 1, maxItems: 4, items: { type: 'string', minLength: 1 } },
  n: nullable({ type: 'integer' }),
  stream: nullable({ type: 'boolean' }),
  stream_options: nullable({ type: 'object', properties: { include_usage: nullable({ type: 'boolean' }) } }),
  user: nullable({ type: 'string' }),
} as const;

export const COMPLETION_SCHEMA = {
  type: 'object',
  required: ['model', 'prompt'],
  properties: {
    ...COMMON_FIELDS,
    // A string, a list of strings, a list of token ids, or a list of lists of token ids.
    prompt: {
      type: ['string', 'array'],
      minItems: 1,
      items: {
        anyOf: [{ type: 'string' }, { type: 'integer' }, { type: 'array', minItems: 1, items: { type: 'integer' } }],
      },
    },
    logprobs: nullable({ type: 'integer', minimum: 0, maximum: 5 }),
    echo: nullable({ type: 'boolean' }),
    best_of: nullable({ type: 'integer' }),
    suffix: nullable({ type: 'string' }),
  },
} as const;

const TEXT_PART = {
  type: 'object',
  required: ['type', 'text'],
  properties: { type: { const: 'text' }, text: { type: 'string' } },
} as const;

export const CHAT_SCHEMA = {
  type: 'object',
  required: ['model', 'messages'],
  properties: {
    ...COMMON_FIELDS,
    max_completion_tokens: nullable({ type: 'integer', minimum: 0 }),
    messages: {
      type: 'array',
      minItems: 1,
      items: {
        type: 'object',
        required: ['role', 'content'],
        properties: {
          role: { enum: ['system', 'developer', 'user', 'assistant'] },
          content: { type: ['string', 'array'], minItems: 1, items: TEXT_PART },
          name: { type: 'string' },
        },
      },
    },
    logprobs: nullable({ type: 'boolean' }),
    top_logprobs: nullable({ type: 'integer', minimum: 0, maximum: 20 }),
  },
} as const;

/** The fields both bodies share, as the schemas above let them through. */
export interface CommonBody {
  model: string;
  max_tokens?: number | null;
  temperature?: number | null;
  top_p?: number | null;
  seed?: number | null;
  stop?: string | string[] | null;
  n?: number | null;
  stream?: boolean | null;
  stream_options?: { include_usage?: boolean | null } | null;
  user?: string | null;
}

export interface CompletionBody extends CommonBody {
  prompt: string | Array<string | number | number[]>;
  logprobs?: number | null;
  echo?: boolean | null;
  best_of?: number | null;
  suffix?: string | null;
}

export interface ChatBody extends CommonBody {
  max_completion_tokens?: number | null;
  messages: Array<{
    role: 'system' | 'developer' | 'user' | 'assistant';
    content: string | Array<{ type: 'text'; text: string }>;
    name?: string;
  }>;
  logprobs?: boolean | null;
  top_logprobs?: number | null;
}
