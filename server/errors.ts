/**
 * Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status
 * OpenAI's API gives each: 400 for a bad request (malformed JSON, a missing or wrongly typed field,
 * a prompt too long for the model), 401 for a missing or wrong API key, 404 for an unknown model or
 * path, 413 for a body over the size limit, 415 for a body that is not UTF-8 JSON, 429 when the
 * queue is full, 500 for a failure of the server itself, 503 while the model loads.
 */
import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { GenerationError } from '../generation/generate';
import { SamplingError } from '../generation/sampling';
import { TokenizerError } from '../tokenizer/error';

/** The body of every error response. */
export interface OpenAIErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null };
}

/** An error a handler answers with: its HTTP status and OpenAI error fields. */
export class ApiError extends Error {
  override name = 'ApiError';

  constructor(
    readonly status: number,
    message: string,
    readonly param: string | null = null,
    readonly code: string | null = null,
    readonly type: string = status >= 500 ? 'server_error' : 'invalid_request_error',
    /** Headers to send with it (Retry-After for 429 and 503). */
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }

  toJSON(): OpenAIErrorBody {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

/** A 400 about one field of the body. */
export function badField(param: string | null, message: string, code: string | null = null): ApiError {
  return new ApiError(400, message, param, code);
}

/** One of ajv's errors, as fastify attaches them to a validation error. */
interface AjvError {
  keyword: string;
  instancePath: string;
  message?: string;
  params: Record<string, unknown>;
}

const typeName = (value: unknown): string => (value === null ? 'null' : Array.isArray(value) ? 'array' : typeof value);

/** "/messages/0/content" -> "messages[0].content" */
function fieldName(instancePath: string): string {
  return instancePath
    .split('/')
    .slice(1)
    .map((part, i) => (/^\d+$/.test(part) ? `[${part}]` : i === 0 ? part : `.${part}`))
    .join('');
}

/** The value at an ajv instancePath in the body. */
function valueAt(body: unknown, instancePath: string): unknown {
  let value = body;
  for (const part of instancePath.split('/').slice(1)) {
    value = typeof value === 'object' && value !== null ? (value as Record<string, unknown>)[part] : undefined;
  }
  return value;
}

/** A schema validation failure as OpenAI words it: the field (its top-level name as param) and what was expected. */
export function validationError(errors: readonly AjvError[], body: unknown): ApiError {
  // For anyOf, ajv lists each branch's failure and then the anyOf itself: report the anyOf.
  const e = errors.find((x) => x.keyword === 'anyOf') ?? errors[0];
  if (e === undefined) return new ApiError(400, 'Invalid request body.');
  if (e.keyword === 'required') {
    const missing = String(e.params.missingProperty);
    const where = e.instancePath === '' ? missing : `${fieldName(e.instancePath)}.${missing}`;
    return badField(where.split(/[.[]/)[0], `Missing required parameter: '${where}'.`, 'missing_required_parameter');
  }
  const field = fieldName(e.instancePath) || 'body';
  const param = field === 'body' ? null : field.split(/[.[]/)[0];
  const value = valueAt(body, e.instancePath);
  if (e.keyword === 'type' || e.keyword === 'anyOf') {
    const expected = e.keyword === 'type' ? String(e.params.type).replace(/,/g, ' or ') : 'a string, an integer or an array of integers';
    const message = field === 'body' ? `The request body must be a JSON object, got ${typeName(value)}.` : `Invalid type for '${field}': expected ${expected}, but got ${typeName(value)}.`;
    return badField(param, message, 'invalid_type');
  }
  return badField(param, `Invalid value for '${field}': ${e.message ?? 'not allowed'} (got ${JSON.stringify(value)}).`, 'invalid_value');
}

/** fastify's error handler: every error becomes OpenAI's error JSON with the right status. */
export function handleError(error: FastifyError | Error, request: FastifyRequest, reply: FastifyReply): void {
  const err = error as FastifyError & { validation?: AjvError[] };
  let api: ApiError;
  if (err instanceof ApiError) api = err;
  else if (err.validation) api = validationError(err.validation, request.body);
  else if (err.code === 'FST_ERR_CTP_BODY_TOO_LARGE') {
    api = new ApiError(413, `The request body is larger than this server's limit of ${request.routeOptions.bodyLimit ?? '?'} bytes.`, null, 'request_too_large');
  } else if (err.code === 'FST_ERR_CTP_INVALID_JSON_BODY' || err.code === 'FST_ERR_CTP_EMPTY_JSON_BODY') {
    api = new ApiError(400, 'We could not parse the JSON body of your request: it is not valid JSON.', null, 'invalid_json');
  } else if (err.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') {
    api = new ApiError(415, `Unsupported Content-Type ${JSON.stringify(request.headers['content-type'] ?? '')}: send application/json.`, null, 'unsupported_media_type');
  } else if (err instanceof GenerationError || err instanceof SamplingError || err instanceof TokenizerError) {
    api = new ApiError(400, err.message);
  } else if (typeof err.statusCode === 'number' && err.statusCode >= 400 && err.statusCode < 500) {
    api = new ApiError(err.statusCode, err.message, null, err.code ?? null);
  } else {
    request.log.error(err);
    api = new ApiError(500, `The server had an error while processing your request: ${err.message.split('\n')[0]}`);
  }
  if (reply.sent || reply.raw.destroyed) return; // a stream already under way, or a client gone
  void reply.code(api.status).headers(api.headers).type('application/json; charset=utf-8').send(api.toJSON());
}
