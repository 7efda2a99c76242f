/**
 * The chat format of Mistral-7B-Instruct-v0.1 (mistral-common's "tokenizer V1"), built from ids:
 *
 *   <s>[INST] {user} [/INST]{assistant}</s>[INST] {user} [/INST]
 *
 * where <s> and </s> are the BOS and EOS token ids (encoding the text "<s>" gives the characters,
 * not the token) and only the first instruction begins with BOS. As mistral-common's
 * InstructTokenizerV1 does, each "[INST] {user} [/INST]" and each assistant reply is encoded on its
 * own, so each begins with SentencePiece's dummy-prefix space ("▁[", "▁Fine"), and a system message
 * is put before the first user message's content with a blank line between them.
 */
import { TokenizerError } from './error';

export type Role = 'system' | 'user' | 'assistant';

export interface ChatMessage {
  role: Role;
  content: string;
}

/** What the Instruct format needs from a tokenizer (SentencePieceProcessor and one_file_ref's Tokenizer fit). */
export interface InstructTokenizer {
  encode(text: string, bos: boolean): number[];
  readonly bosId: number;
  readonly eosId: number;
}

/** "[INST] {prompt} [/INST]": one user turn as text, for a generate() that adds BOS itself (the CLI's --instruct). */
export function wrapInstruct(prompt: string): string {
  if (typeof prompt !== 'string') throw new TokenizerError(`wrapInstruct: prompt must be a string, got ${typeof prompt}`);
  return `[INST] ${prompt} [/INST]`;
}

/**
 * The ids of a conversation in the v0.1 Instruct format, ready for the model to write the next
 * assistant reply. `messages` must be user and assistant turns alternating, starting and ending with
 * a user turn, optionally preceded by one system message (which is prepended to the first user
 * message as "{system}\n\n{user}"). Throws a TokenizerError naming the offending message otherwise.
 */
export function encodeInstruct(tokenizer: InstructTokenizer, messages: readonly ChatMessage[]): number[] {
  const turns = validate(messages);
  if (tokenizer.bosId < 0 || tokenizer.eosId < 0) {
    throw new TokenizerError('encodeInstruct: the tokenizer has no BOS or EOS piece');
  }
  const ids = [tokenizer.bosId];
  for (const { role, content } of turns) {
    if (role === 'user') {
      ids.push(...tokenizer.encode(wrapInstruct(content), false));
    } else {
      ids.push(...tokenizer.encode(content, false), tokenizer.eosId);
    }
  }
  return ids;
}

/** Checks the messages and returns the user/assistant turns with the system message folded into the first. */
function validate(messages: readonly ChatMessage[]): ChatMessage[] {
  if (!Array.isArray(messages)) throw new TokenizerError('messages: expected an array of {role, content}');
  if (messages.length === 0) throw new TokenizerError('messages: expected at least one user message, got none');
  messages.forEach((m, i) => {
    if (typeof m !== 'object' || m === null) throw new TokenizerError(`messages[${i}]: expected an object {role, content}`);
    if (m.role !== 'system' && m.role !== 'user' && m.role !== 'assistant') {
      throw new TokenizerError(`messages[${i}].role: expected "system", "user" or "assistant", got ${JSON.stringify(m.role)}`);
    }
    if (typeof m.content !== 'string') {
      throw new TokenizerError(`messages[${i}].content: expected a string, got ${m.content === null ? 'null' : typeof m.content}`);
    }
  });
  let system: string | undefined;
  let rest = messages;
  if (messages[0].role === 'system') {
    system = messages[0].content;
    rest = messages.slice(1);
  }
  const offset = messages.length - rest.length;
  if (rest.length === 0) throw new TokenizerError('messages: expected a user message after the system message');
  rest.forEach((m, j) => {
    const i = j + offset;
    const expected: Role = j % 2 === 0 ? 'user' : 'assistant';
    if (m.role === 'system') {
      throw new TokenizerError(`messages[${i}]: a system message may only come first`);
    }
    if (m.role !== expected) {
      throw new TokenizerError(
        `messages[${i}]: expected ${expected === 'user' ? 'a user' : 'an assistant'} message (turns must alternate user/assistant), got ${m.role}`,
      );
    }
    if (m.role === 'assistant' && m.content === '') {
      throw new TokenizerError(`messages[${i}].content: an assistant message must not be empty`);
    }
  });
  const last = rest[rest.length - 1];
  if (last.role !== 'user') {
    throw new TokenizerError(`messages[${messages.length - 1}]: the conversation must end with a user message, got ${last.role}`);
  }
  const turns = rest.map((m) => ({ role: m.role, content: m.content }));
  // mistral-common's V1: "if is_first and system_prompt" -- an empty system message adds nothing.
  if (system) turns[0].content = `${system}\n\n${turns[0].content}`;
  return turns;
}
