/**
 * Types for @agnai/sentencepiece-js 1.1.1, which ships JavaScript only: the real C++ SentencePiece
 * compiled to WebAssembly with emscripten, behind a thin wrapper class. Only what tokenizer/ uses
 * is declared. `sentencepiece` and `processor` are the wrapper's own (undocumented) fields, set by
 * load(); their embind objects live in the wasm heap and must be freed with delete().
 */
declare module '@agnai/sentencepiece-js' {
  /** An embind handle to a C++ object; delete() frees it. */
  interface EmbindHandle {
    delete(): void;
  }

  /** sentencepiece::util::Status (has ok() in C++, but only ToString() is bound: "OK" when ok). */
  interface WasmStatus extends EmbindHandle {
    ToString(): string;
  }

  /** absl::string_view over a StringView's bytes. */
  type WasmAbslStringView = EmbindHandle;

  /** Holds a std::string made from a JS string (UTF-8 encoded by embind). */
  interface WasmStringView extends EmbindHandle {
    getView(): WasmAbslStringView;
  }

  /** The bound C++ sentencepiece::SentencePieceProcessor. */
  interface WasmProcessor extends EmbindHandle {
    status(): WasmStatus;
    PieceToId(piece: WasmAbslStringView): number;
  }

  /** The emscripten module instance that load() creates. */
  interface WasmModule {
    StringView: new (text: string) => WasmStringView;
  }

  export class SentencePieceProcessor {
    /** Reads the model file at `path` (with fs) and loads it; does not reject on a bad model. */
    load(path: string): Promise<void>;
    /** Ids of the text, without BOS/EOS; [] when no model is loaded. */
    encodeIds(text: string): number[];
    encodePieces(text: string): string[];
    /** Text of the ids; "" for an out-of-range id. */
    decodeIds(ids: number[]): string;
    sentencepiece: WasmModule;
    processor: WasmProcessor;
  }

  export function cleanText(text: string): string;
}
