/** Reading a tensor's values back to the host. */
import * as tf from '@tensorflow/tfjs-core';

/**
 * The values of the tensor `make` returns, read after tf.tidy has returned and freed the rest.
 * (Returning dataSync()'s array from inside tf.tidy makes tidy walk it element by element looking
 * for tensors: for a [1, 128, 32000] logits array that cost ten times the forward.)
 */
export function readBack(make: () => tf.Tensor): Float32Array | Int32Array | Uint8Array {
  const t = tf.tidy(make);
  try {
    return t.dataSync() as Float32Array | Int32Array | Uint8Array;
  } finally {
    t.dispose();
  }
}
