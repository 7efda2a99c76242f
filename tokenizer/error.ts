/** The one error type of tokenizer/: a one-line message naming the file (or argument) and what was expected. */
export class TokenizerError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TokenizerError';
  }
}
