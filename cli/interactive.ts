/**
 * The `interactive` command, main.py's `interactive`: a prompt loop on stdin.
 *
 *   one_file_ref.ts interactive MODEL [--instruct [--system TEXT]] [--max-tokens N] [sampling flags]
 *
 * Without --instruct each line is a new prompt, completed from position 0 (as main.py does). With
 * --instruct it is a chat with Mistral-7B-Instruct kept in the rolling KV cache (generation/chat.ts):
 * a turn feeds only the new message. Answers stream as they are generated. Ctrl-C stops the current
 * answer (at the prompt it clears the line); Ctrl-D, or the end of stdin, exits.
 */
import * as readline from 'readline';
import { ChatSession } from '../generation/chat';
import { complete, type Completion, type GenerateOptions } from '../generation/generate';
import { COMMON_HELP, modelPath, parseCommandLine, UsageError, type OptionSpec } from './args';
import { generateOptionsFromFlags, SAMPLING_HELP, SAMPLING_OPTIONS } from './generate';
import { instructWarning } from './instruct_check';
import { loadForCommand } from './load';

const CHAT_MAX_TOKENS = 512;

export const INTERACTIVE_HELP = `  npx ts-node one_file_ref.ts interactive MODEL [--instruct [--system TEXT]] [--max-tokens N]
                      [--temperature T] [--top-p P] [--top-k K] [--seed N] [--stop TEXT ...]
                      [--chunk-size N]
      A prompt loop (main.py's interactive): each line is completed, streamed as it comes.
      Ctrl-C stops the current answer; Ctrl-D exits.
      --instruct       a chat with Mistral-7B-Instruct: the conversation stays in the rolling
                       KV cache, each turn feeds only the new message; "/reset" starts over
      --system TEXT    with --instruct: a system message before the first user message
      --max-tokens N   new tokens per answer at most (default 35, main.py's; with --instruct ${CHAT_MAX_TOKENS})
${SAMPLING_HELP}      Answer k of a session (from 0) is sampled with seed N + k; the session's N is printed
      on stderr at the start.
`;

const OPTIONS = {
  ...SAMPLING_OPTIONS,
  instruct: { type: 'boolean' },
  system: { type: 'string' },
} as const satisfies OptionSpec;

export async function interactiveCommand(argv: string[]): Promise<void> {
  const { values, positionals } = parseCommandLine(argv, OPTIONS);
  if (values.help) {
    process.stdout.write(`Usage:\n${INTERACTIVE_HELP}\n${COMMON_HELP}`);
    return;
  }
  const model = modelPath(positionals);
  const instruct = values.instruct === true;
  const { seed, ...opts } = generateOptionsFromFlags(values, instruct ? CHAT_MAX_TOKENS : 35);
  if (values.system !== undefined && !instruct) throw new UsageError('--system needs --instruct');
  const warning = instruct && !values.quiet ? instructWarning(model) : undefined;
  if (warning !== undefined) process.stderr.write(`${warning}\n`);

  const loaded = await loadForCommand(model, values, 1);
  const [tokenizer, transformer] = [loaded.tokenizer.processor, loaded.transformer];
  if (!values.quiet && opts.temperature !== 0) process.stderr.write(`seed: ${seed}\n`);
  const chat = instruct ? new ChatSession(transformer, tokenizer, { system: values.system }) : null;
  const terminal = process.stdin.isTTY === true && process.stdout.isTTY === true;
  const rl = readline.createInterface({ input: process.stdin, output: process.stdout, terminal });
  rl.setPrompt(instruct ? '> ' : 'Prompt: ');

  let answering: AbortController | null = null;
  let closed = false;
  const prompt = (): void => {
    if (!closed) rl.prompt();
    else if (!terminal) process.stdout.write(rl.getPrompt()); // piped input read ahead: still one prompt per line
  };
  const interrupt = (): void => {
    if (answering) {
      answering.abort();
    } else if (terminal) {
      // At the prompt: drop what was typed and ask again, as a shell does.
      rl.write(null, { ctrl: true, name: 'e' });
      rl.write(null, { ctrl: true, name: 'u' });
      process.stdout.write('^C (Ctrl-D exits)\n');
      prompt();
    } else {
      rl.close();
    }
  };
  rl.on('SIGINT', interrupt); // Ctrl-C typed on the terminal (readline reads it as a key)
  process.on('SIGINT', interrupt); // a real signal, e.g. when stdin is not a terminal
  rl.on('close', () => {
    closed = true;
    // Ctrl-D on a terminal exits at once; the end of piped input ends the loop once the lines read are answered.
    if (terminal) answering?.abort();
  });

  try {
    let turn = 0;
    prompt();
    for await (const line of rl) {
      if (line.trim() === '') {
        prompt();
        continue;
      }
      if (chat && line.trim() === '/reset') {
        chat.reset();
        process.stdout.write('(new conversation)\n');
        prompt();
        continue;
      }
      answering = new AbortController();
      const turnOpts: GenerateOptions = {
        ...opts,
        seed: (seed + turn++) % 2 ** 32,
        signal: answering.signal,
        onText: (text) => void process.stdout.write(text),
      };
      let completion: Completion | undefined;
      try {
        if (chat) {
          completion = await chat.send(line, turnOpts);
        } else {
          process.stdout.write(line);
          completion = await complete(transformer, tokenizer, tokenizer.encode(line, true), turnOpts);
        }
      } catch (err) {
        // A turn that cannot run (e.g. a conversation past the model's positions) ends the turn, not the session.
        process.stdout.write(`\nerror: ${err instanceof Error ? err.message.split('\n')[0] : String(err)}\n`);
      } finally {
        answering = null;
      }
      if (completion) {
        process.stdout.write(completion.finishReason === 'abort' ? ' [stopped]\n' : '\n');
        if (!chat) process.stdout.write('=====================\n');
        if (!values.quiet) {
          const rate = completion.timings.decodeMs > 0 ? (1000 * completion.generatedIds.length) / completion.timings.decodeMs : 0;
          const context = chat ? `, ${chat.ids.length} tokens in the conversation` : '';
          process.stderr.write(`[${completion.generatedIds.length} tokens, ${rate.toFixed(1)} tokens/s, ${completion.finishReason}${context}]\n`);
        }
      }
      prompt();
    }
  } finally {
    process.off('SIGINT', interrupt);
    rl.close();
    transformer.dispose();
  }
  if (terminal) process.stdout.write('\n');
}
