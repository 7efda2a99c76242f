/** GET /health and GET /v1/models: what a supervisor and a client ask before generating. */
import type { FastifyInstance } from 'fastify';
import { checkModel, type RouteContext } from './common';

/**
 * GET /health: 200 `{"status": "ok"}` once the model is loaded and answering; 503 with
 * `{"status": "loading"}` while it loads and `{"status": "failed"}` once its backend stopped working
 * (the server then exits). The only route that never needs the API key.
 */
export function registerHealth(app: FastifyInstance, ctx: RouteContext): void {
  app.get('/health', async (_request, reply) => {
    const { state } = ctx.host;
    if (state !== 'ready') void reply.code(503);
    return { status: state === 'ready' ? 'ok' : state, model: ctx.modelName };
  });
}

/** GET /v1/models and /v1/models/:model: the one model, named by modelName (answered while it loads too). */
export function registerModels(app: FastifyInstance, ctx: RouteContext): void {
  const modelObject = () => ({ id: ctx.modelName, object: 'model', created: ctx.created, owned_by: 'mistral-ts-ref' });
  app.get('/v1/models', async () => ({ object: 'list', data: [modelObject()] }));
  app.get<{ Params: { model: string } }>('/v1/models/:model', async (request) => {
    checkModel(ctx, request.params.model);
    return modelObject();
  });
}
