/**
 * A chat with Mistral-7B-Instruct that keeps the conversation in the model's rolling KV cache.
 *
 * The conversation is one sequence of ids in the v0.1 Instruct format (tokenizer/instruct.ts):
 *
 *   <s>[INST] {user 1} [/INST]{answer 1}</s>[INST] {user 2} [/INST]{answer 2}</s>...
 *
 * Each turn encodes only the new user message, feeds it at the next positions in chunked forwards
 * (which attend to the W-1 cached positions before them) and generates the answer after it; the
 * answer's ids and the EOS that closes it stay in the history at their positions. Nothing is
 * re-encoded or re-run, so a turn costs its own tokens however long the conversation, and past
 * sliding_window tokens the model sees exactly what a prefill of the whole history would show it.
 *
 * The session uses row 0 of the model's cache. If anything else of generation/ ran on the same
 * model in between (complete(), another session), the next turn first replays the whole history
 * from position 0, so the answer is still right, only slower. Code that calls model.forward
 * directly (the reference's generate()) is not seen: do not mix it with a session on one model.
 */
import { MAX_POSITIONS, type Transformer } from '../one_file_ref';
import { encodeInstruct, type ChatMessage, type InstructTokenizer } from '../tokenizer/instruct';
import { GenerationError, runSequence, withModel, type Completion, type GenerateOptions, type GenerationTokenizer, type SequenceRun } from './generate';

/** What a chat needs from a tokenizer: encoding the Instruct format, and decoding as generation does. */
export type ChatTokenizer = GenerationTokenizer & InstructTokenizer;

export interface ChatOptions {
  /** A system message, put before the first user message as mistral-common's v1 format does. */
  system?: string;
}

export class ChatSession {
  /** The whole conversation, in order: ids[p] is the token at position p. */
  private readonly history: number[] = [];
  /** How many ids of the history are in the cache, in order from position 0; the rest wait for the next forward. */
  private inCache = 0;

  constructor(
    readonly model: Transformer,
    readonly tokenizer: ChatTokenizer,
    readonly opts: ChatOptions = {},
  ) {}

  /** The conversation's ids so far (BOS, turns, answers, EOS after each answer). */
  get ids(): readonly number[] {
    return this.history;
  }

  /** Forgets the conversation: the next turn starts a new one at position 0. */
  reset(): void {
    this.history.length = 0;
    this.inCache = 0;
  }

  /**
   * Adds a user message and generates the answer. The answer ends at EOS, maxTokens, a stop string
   * or an abort; whatever it is, its ids (all of them, a stop string's too) and an EOS closing it
   * join the history, so the next turn continues a well-formed conversation.
   */
  async send(user: string, opts: GenerateOptions): Promise<Completion> {
    // Turns wait for any other run on the model, then see whether it left the cache to us.
    return withModel(this.model, this, async (ownedBefore) => {
      const first = this.history.length === 0;
      const messages: ChatMessage[] = [{ role: 'user', content: user }];
      if (first && this.opts.system) messages.unshift({ role: 'system', content: this.opts.system });
      const turn = encodeInstruct(this.tokenizer, messages);
      if (!first) turn.shift(); // only the first turn has BOS

      // Feed what the cache lacks: normally the last answer's last token, the EOS closing it, and
      // this turn; everything from position 0 if another run used the cache since.
      if (!ownedBefore) this.inCache = 0;
      const startPos = this.inCache;
      const input = [...this.history.slice(startPos), ...turn];
      // + 1: the EOS that closes the answer
      if (startPos + input.length + opts.maxTokens + 1 > MAX_POSITIONS) {
        throw new GenerationError(
          `the conversation would run past position ${MAX_POSITIONS - 1}, the last the model has rotary angles for; start a new one`,
        );
      }

      // The answer is decoded on its own (context []): as mistral-common encodes an assistant
      // message alone, its first piece's dummy-prefix space is not part of the text.
      let run: SequenceRun;
      try {
        run = await runSequence(this.model, this.tokenizer, input, opts, { startPos, context: [] });
      } catch (err) {
        this.inCache = 0; // whatever the cache holds now, the next turn replays the history
        throw err;
      }
      const { completion, fed } = run;

      const answer = completion.generatedIds;
      const closed = answer[answer.length - 1] === this.tokenizer.eosId ? answer : [...answer, this.tokenizer.eosId];
      this.history.push(...turn, ...closed);
      this.inCache = startPos + fed;
      return completion;
    });
  }
}
