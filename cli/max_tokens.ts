/**
 * `--max-tokens` means two things, both kept: in the reference command (`MODEL --prompt ...`) it
 * counts the reference generate()'s steps per row, the teacher-forced prompt tokens of the longer
 * prompts included (for parity with one_file_ref.py); in `generate` and `interactive` it counts
 * new tokens. The note below says so when the difference cuts a prompt short.
 */

/** One sentence each, for --help and the README. */
export const MAX_TOKENS_MEANINGS =
  `--max-tokens N: with the reference command (MODEL --prompt ...) N counts steps per row as the
reference's generate() does, a longer prompt's teacher-forced tokens included, so that row gets
fewer new tokens (none when N is not above its length minus the shortest prompt's).
With generate and interactive, N counts new tokens only, the prompt not included.
`;

/**
 * The note for the reference command when `maxTokens` leaves some prompt without a single new
 * token: prefill covers the shortest prompt (`min(promptLengths)` tokens, BOS included), and a
 * row of length L spends L - min of the steps on its own prompt, so its text stops inside the
 * prompt when maxTokens <= L - min. undefined when every row gets a new token, or maxTokens is 0
 * (the reference then returns no texts at all, which the README states).
 */
export function maxTokensNote(promptLengths: number[], maxTokens: number): string | undefined {
  if (maxTokens === 0 || promptLengths.length === 0) return undefined;
  const shortest = Math.min(...promptLengths);
  const cut = promptLengths.map((len, i) => ({ i, forced: len - shortest })).filter((r) => r.forced >= maxTokens);
  if (cut.length === 0) return undefined;
  const worst = Math.max(...cut.map((r) => r.forced));
  const which = cut.map((r) => r.i + 1).join(', ');
  const many = cut.length > 1;
  return (
    `note: --max-tokens ${maxTokens} counts the reference's steps per row, teacher-forced prompt tokens included: ` +
    `prompt${many ? 's' : ''} ${which} ${many ? 'are up to' : 'is'} ${worst} tokens longer than the shortest (${shortest} tokens), ` +
    `so ${many ? 'their texts stop inside their prompts' : 'its text stops inside the prompt'} with no new token; ` +
    `--max-tokens ${worst + 1} or more gives ${many ? 'them' : 'it'} new tokens (generate's --max-tokens counts new tokens only)`
  );
}

/** Prints maxTokensNote on stderr unless --quiet. */
export function noteMaxTokens(flags: { quiet?: boolean }, promptLengths: number[], maxTokens: number): void {
  const note = maxTokensNote(promptLengths, maxTokens);
  if (note !== undefined && !flags.quiet) process.stderr.write(`${note}\n`);
}
