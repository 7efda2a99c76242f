/** Test helpers: a checkpoint's weights under other hyperparameters that do not change its tensors. */
import * as tf from '@tensorflow/tfjs-core';
import { ModelArgs, Transformer } from '../one_file_ref';

/**
 * The same weights with another sliding window and batch size, in a model with KV caches of its
 * own (the weights do not depend on the window). Free it with disposeCaches(), not dispose(): the
 * weights belong to `base`.
 */
export function withWindow(base: Transformer, slidingWindow: number, maxBatchSize: number): Transformer {
  const a = base.args;
  const args = new ModelArgs(a.dim, a.nLayers, a.headDim, a.hiddenDim, a.nHeads, a.nKvHeads, slidingWindow, a.normEps, a.vocabSize, a.ropeTheta, maxBatchSize);
  return new Transformer(args, base.stateDict);
}

/** Frees the KV caches of a model made by withWindow(). */
export function disposeCaches(model: Transformer): void {
  for (const layer of model.layers) layer.attention.dispose();
}

/**
 * The values of a tensor made by `f`, read back after tf.tidy has freed everything else. (Returning
 * dataSync()'s array from inside tf.tidy makes tidy walk every element looking for tensors.)
 */
export function readBack(f: () => tf.Tensor): Float32Array {
  const t = tf.tidy(f); // a float32 tensor
  try {
    return t.dataSync() as Float32Array;
  } finally {
    t.dispose();
  }
}
