/**
 * The zip format's numbers, shared by the seekable reader (zip.ts) and the streamed one
 * (pth_stream.ts): record signatures, fixed header sizes, flags and extra-field ids (APPNOTE.TXT).
 */

/** Each record's 4-byte signature, little-endian ("PK\x03\x04" and so on). */
export const ZIP_SIG = {
  /** Local file header, before each record's data. */
  local: 0x04034b50,
  /** Data descriptor after a record's data when flag bit 3 is set (the signature is optional). */
  descriptor: 0x08074b50,
  /** Central directory file header, one per record. */
  central: 0x02014b50,
  /** zip64 end of central directory record. */
  eocd64: 0x06064b50,
  /** zip64 end of central directory locator, just before the classic end record. */
  eocd64Locator: 0x07064b50,
  /** End of central directory record, last in the file. */
  eocd: 0x06054b50,
} as const;

/** Fixed sizes, signatures included. */
export const LOCAL_HEADER_SIZE = 30;
export const CENTRAL_HEADER_SIZE = 46;
export const EOCD_SIZE = 22;
export const EOCD64_LOCATOR_SIZE = 20;
export const EOCD64_MIN_SIZE = 56;
export const MAX_COMMENT = 0xffff;

/** General-purpose flag bits. */
export const FLAG_ENCRYPTED = 0x0001;
export const FLAG_DESCRIPTOR = 0x0008;

/** The extra field holding 64-bit sizes and offsets. */
export const ZIP64_EXTRA_ID = 0x0001;
/** A 32-bit size or offset field with this value has its real value in the zip64 extra field. */
export const SATURATED_32 = 0xffffffff;
