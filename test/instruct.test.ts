/**
 * Tests tokenizer/instruct.ts, the Mistral-7B-Instruct-v0.1 chat format built from ids, against id
 * sequences written out here as literals. They were derived with Python's sentencepiece (0.1.97, the
 * genuine tokenizer.model.v1 and fixtures/tiny/tokenizer.model) following mistral-common's
 * InstructTokenizerV1 by hand: [bos_id] + sp.encode("[INST] {user} [/INST]") + sp.encode(assistant)
 * + [eos_id] + sp.encode("[INST] {user} [/INST]"), a system message joined to the first user message
 * with "\n\n"; and checked piece by piece (sp.id_to_piece), e.g. for v1
 *   <s> ▁[ INST ] ▁What ▁is ▁your ▁favourite ▁cond iment ? ▁[ / INST ]
 */
import * as fs from 'fs';
import { beforeAll, describe, expect, it } from 'vitest';
import { SentencePieceProcessor, TokenizerError } from '../tokenizer';
import { encodeInstruct, wrapInstruct, type ChatMessage } from '../tokenizer/instruct';
import { Tokenizer } from '../one_file_ref';
import { MODELS, modelTitle, TINY_TOKENIZER } from './tokenizer_cases';

const CONDIMENT = 'What is your favourite condiment?';
const LEMON =
  "Well, I'm quite partial to a good squeeze of fresh lemon juice. It adds just the right amount of zesty flavour to whatever I'm cooking up in the kitchen!";
const MAYO = 'Do you have mayonnaise recipes?';

/** The conversation of the Mistral-7B-Instruct-v0.1 model card. */
const CARD: ChatMessage[] = [
  { role: 'user', content: CONDIMENT },
  { role: 'assistant', content: LEMON },
  { role: 'user', content: MAYO },
];

const WITH_SYSTEM: ChatMessage[] = [
  { role: 'system', content: 'Always answer in French.' },
  { role: 'user', content: 'Hi' },
  { role: 'assistant', content: 'Bonjour !' },
  { role: 'user', content: 'How are you?' },
];

/** Python, tokenizer.model.v1: <s> ▁[ INST ] ▁What ▁is ▁your ▁favourite ▁cond iment ? ▁[ / INST ] */
const V1_SINGLE = [1, 733, 16289, 28793, 1824, 349, 574, 16020, 2076, 2487, 28804, 733, 28748, 16289, 28793];

/** Python, v1: the single turn, then ▁Well , ▁I ' m ... ▁kitchen ! </s> ▁[ INST ] ▁Do ▁you ▁have ▁may onna ise ▁recipes ? ▁[ / INST ] */
const V1_CARD = [
  ...V1_SINGLE,
  4673, 28725, 315, 28742, 28719, 3448, 10473, 298, 264, 1179, 11322, 19961, 302, 6138, 23598, 18342, 28723, 661, 13633,
  776, 272, 1103, 3558, 302, 686, 16944, 15637, 423, 298, 5681, 315, 28742, 28719, 13198, 582, 297, 272, 6132, 28808, 2,
  733, 16289, 28793, 2378, 368, 506, 993, 7136, 864, 21116, 28804, 733, 28748, 16289, 28793,
];

/**
 * Python, v1: <s> ▁[ INST ] ▁Always ▁answer ▁in ▁French . <0x0A> <0x0A> Hi ▁[ / INST ] ▁Bon jour ▁! </s>
 * ▁[ INST ] ▁How ▁are ▁you ? ▁[ / INST ]
 */
const V1_WITH_SYSTEM = [
  1, 733, 16289, 28793, 17484, 4372, 297, 4949, 28723, 13, 13, 23809, 733, 28748, 16289, 28793, 8500, 18777, 918, 2, 733,
  16289, 28793, 1602, 460, 368, 28804, 733, 28748, 16289, 28793,
];

/** Python, fixtures/tiny/tokenizer.model: <s> ▁ <0x5B> I N S T <0x5D> ▁ W h at ▁ is ▁you r ... ? ▁ <0x5B> <0x2F> I N S T <0x5D> */
const TINY_SINGLE = [
  1, 425, 94, 455, 493, 476, 450, 96, 425, 490, 431, 296, 425, 369, 306, 430, 270, 427, 452, 329, 284, 426, 413, 275, 433, 439,
  289, 428, 462, 425, 94, 50, 455, 493, 476, 450, 96,
];

/** Python, tiny: <s> ▁ <0x5B> I N S T <0x5D> ▁A l w ay s ... . <0x0A> <0x0A> H i ... ▁ B on j our ▁ ! </s> ▁ <0x5B> I N S T <0x5D> ▁H o w ... */
const TINY_WITH_SYSTEM = [
  1, 425, 94, 455, 493, 476, 450, 96, 303, 436, 441, 341, 434, 261, 435, 434, 441, 277, 401, 425, 494, 267, 435, 364, 437, 13,
  13, 487, 433, 425, 94, 50, 455, 493, 476, 450, 96, 425, 489, 349, 483, 329, 425, 496, 2, 425, 94, 455, 493, 476, 450, 96,
  417, 429, 441, 261, 267, 306, 462, 425, 94, 50, 455, 493, 476, 450, 96,
];

describe('wrapInstruct', () => {
  it('wraps a prompt as one v0.1 user turn', () => {
    expect(wrapInstruct('Hi there')).toBe('[INST] Hi there [/INST]');
    expect(wrapInstruct('')).toBe('[INST]  [/INST]');
  });
});

describe('encodeInstruct with the project tokenizer', () => {
  let tok: SentencePieceProcessor;
  beforeAll(async () => {
    tok = await SentencePieceProcessor.load(TINY_TOKENIZER);
  });

  it('matches the hand-checked ids', () => {
    expect(encodeInstruct(tok, [{ role: 'user', content: CONDIMENT }])).toEqual(TINY_SINGLE);
    expect(encodeInstruct(tok, WITH_SYSTEM)).toEqual(TINY_WITH_SYSTEM);
  });

  it('gives for one user turn what the reference Tokenizer gives for wrapInstruct(prompt) (--instruct)', async () => {
    const ref = await Tokenizer.load(TINY_TOKENIZER);
    expect(ref.encode(wrapInstruct(CONDIMENT))).toEqual(TINY_SINGLE);
    expect(encodeInstruct(ref, WITH_SYSTEM)).toEqual(TINY_WITH_SYSTEM);
  });

  it('puts BOS only first and EOS after each assistant reply, as ids (the text "<s>" is not the token)', () => {
    const ids = encodeInstruct(tok, CARD);
    expect(ids.filter((id) => id === tok.bosId)).toEqual([tok.bosId]);
    expect(ids[0]).toBe(tok.bosId);
    expect(ids.filter((id) => id === tok.eosId)).toHaveLength(1);
    expect(tok.encode('<s>', false)).not.toContain(tok.bosId);
    // Decoded, it reads as mistral-common's rendering "<s> [INST] q [/INST] a</s> [INST] q2 [/INST]" with
    // <s> and </s> silent and the first piece's dummy-prefix space dropped (only the first piece's).
    expect(tok.decode(ids)).toBe(`[INST] ${CONDIMENT} [/INST] ${LEMON} [INST] ${MAYO} [/INST]`);
  });

  it('ignores an empty system message, as mistral-common does', () => {
    const plain = encodeInstruct(tok, CARD);
    expect(encodeInstruct(tok, [{ role: 'system', content: '' }, ...CARD])).toEqual(plain);
  });

  const bad: [string, unknown, string][] = [
    ['no messages', [], 'messages: expected at least one user message'],
    ['not an array', 'hello', 'messages: expected an array'],
    ['a null message', [null], 'messages[0]: expected an object'],
    ['an unknown role', [{ role: 'tool', content: 'x' }], 'messages[0].role: expected "system", "user" or "assistant", got "tool"'],
    ['content not a string', [{ role: 'user', content: 42 }], 'messages[0].content: expected a string, got number'],
    ['an assistant first', [{ role: 'assistant', content: 'x' }], 'messages[0]: expected a user message'],
    ['two user turns in a row', [{ role: 'user', content: 'a' }, { role: 'user', content: 'b' }], 'messages[1]: expected an assistant message'],
    ['ending with the assistant', CARD.slice(0, 2), 'messages[1]: the conversation must end with a user message, got assistant'],
    ['a second system message', [WITH_SYSTEM[0], WITH_SYSTEM[0], ...CARD], 'messages[1]: a system message may only come first'],
    ['a system message later', [CARD[0], { role: 'system', content: 's' }], 'messages[1]: a system message may only come first'],
    ['only a system message', [WITH_SYSTEM[0]], 'expected a user message after the system message'],
    ['an empty assistant reply', [CARD[0], { role: 'assistant', content: '' }, CARD[2]], 'messages[1].content: an assistant message must not be empty'],
  ];
  it.each(bad)('rejects %s', (_, messages, message) => {
    expect(() => encodeInstruct(tok, messages as ChatMessage[])).toThrow(TokenizerError);
    expect(() => encodeInstruct(tok, messages as ChatMessage[])).toThrow(message);
  });
});

const v1 = MODELS.find((m) => m.name === 'mistral-v1')!;
const v1Available = fs.existsSync(v1.model);
if (!v1Available) console.warn(`instruct.test.ts: skipping the mistral-v1 tests: tokenizer model ${v1.model} not found`);

describe.skipIf(!v1Available)(`encodeInstruct with ${modelTitle(v1, v1Available)}`, () => {
  let tok: SentencePieceProcessor;
  beforeAll(async () => {
    tok = await SentencePieceProcessor.load(v1.model);
  });

  it('matches the hand-checked ids of a single turn, the model card conversation and a system message', () => {
    expect(encodeInstruct(tok, [{ role: 'user', content: CONDIMENT }])).toEqual(V1_SINGLE);
    expect(encodeInstruct(tok, CARD)).toEqual(V1_CARD);
    expect(encodeInstruct(tok, WITH_SYSTEM)).toEqual(V1_WITH_SYSTEM);
  });

  it('agrees with the text path of --instruct for one turn', () => {
    expect(tok.encode(wrapInstruct(CONDIMENT))).toEqual(V1_SINGLE);
  });
});
