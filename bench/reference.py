#!/usr/bin/python3
"""The Python reference's side of the benchmark: mistral-src's one_file_ref.py itself, on the CPU.

    /usr/bin/python3 bench/reference.py --model DIR [--ref /tmp/mistral-src-c18d5b9] [--prefill 128]
        [--decode 32] [--batch 4] [--batch-prefill 128] [--batch-decode 32] [--reps 2]
        [--threads N] [--dtype float32|bfloat16]
    /usr/bin/python3 bench/reference.py --convert DIR     (consolidated.safetensors -> consolidated.00.pth, once)

run.ts starts it in a process of its own and reads the last line, `BENCH_RESULT {json}`. The
workloads are the port's (bench/workloads.ts): the same token ids, greedy steps through
Transformer.forward, timed the same way, each run on a freshly loaded set of caches.

The reference is imported from --ref (an extracted mistral-src checkout; none of its code is in
this repository) and patched at run time, as fixtures/dump_reference.py does, only where it assumes
a GPU:
  - Tensor.cuda() returns the tensor; Tensor.to("cuda") goes to the CPU; the module's own `torch`
    name is a proxy whose full(..., device="cuda") builds on the CPU;
  - the float16 KV caches are cast to the model's dtype after loading.
Loading: Transformer.from_folder(folder, max_batch_size, device="cpu", dtype) with nn.Linear and
nn.Embedding's random initialisation skipped (load_state_dict overwrites it; the port does not draw
random weights either). For a checkpoint too large to hold twice (Mistral 7B: 14.5 GB of bf16 on a
24 GB machine), --stream builds the reference's Transformer the same way and copies the tensors
into it one at a time instead of torch.load-ing them all first; the load time is then this
script's, not the reference's.
"""
import argparse
import contextlib
import json
import os
import pickle
import resource
import struct
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

# The reference is imported and patched exactly as the parity dumps do it (the mask as written: the
# benchmark's sequences are shorter than any window it uses).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fixtures"))
from dump_reference import cuda_is_cpu, import_reference as _import_reference  # noqa: E402

RESULT_MARKER = "BENCH_RESULT "
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fail(message):
    sys.exit(f"bench/reference.py: {message}")


# ----------------------------------------------------------------------------------------------
# The reference, imported and patched where it assumes CUDA


@contextlib.contextmanager
def cuda_is_cpu_and_no_init():
    """fixtures/dump_reference.py's cuda_is_cpu(), and Linear/Embedding skip their random init."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = lambda self: None
    nn.Embedding.reset_parameters = lambda self: None
    try:
        with cuda_is_cpu():
            yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def cast_caches(model, dtype):
    for layer in model.layers:
        layer.attention.cache_k = layer.attention.cache_k.to(dtype)
        layer.attention.cache_v = layer.attention.cache_v.to(dtype)


# ----------------------------------------------------------------------------------------------
# Loading


class _StreamUnpickler(pickle.Unpickler):
    """Reads a torch.save pickle into {name: (storage key, dtype, offset, size, stride)}, no data."""

    STORAGES = {"BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16, "FloatStorage": torch.float32}

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return lambda storage, offset, size, stride, *rest: (storage[0], storage[1], offset, tuple(size), tuple(stride))
        if module == "torch" and name in self.STORAGES:
            return self.STORAGES[name]
        if module == "collections" and name == "OrderedDict":
            return dict
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in the checkpoint")

    def persistent_load(self, pid):
        _, dtype, key, _location, _numel = pid  # ('storage', dtype, key, location, numel)
        return key, dtype


def stream_into(model, pth):
    """Copies every tensor of `pth` into the model's state dict, one at a time (strict: same keys and shapes)."""
    zf = zipfile.ZipFile(pth)
    prefix = zf.namelist()[0].split("/")[0]
    with zf.open(f"{prefix}/data.pkl") as f:
        entries = _StreamUnpickler(f).load()
    params = model.state_dict()
    if set(params) != set(entries):
        fail(f"{pth}: keys differ from the model's: {sorted(set(params) ^ set(entries))[:5]}")
    with open(pth, "rb") as raw:
        for name, (key, dtype, offset, size, stride) in entries.items():
            info = zf.getinfo(f"{prefix}/data/{key}")
            if info.compress_type != zipfile.ZIP_STORED:
                fail(f"{pth}: record {info.filename} is compressed")
            raw.seek(info.header_offset)
            header = raw.read(30)
            data_start = info.header_offset + 30 + struct.unpack("<H", header[26:28])[0] + struct.unpack("<H", header[28:30])[0]
            itemsize = torch.tensor([], dtype=dtype).element_size()
            numel = 1
            for s in size:
                numel *= s
            raw.seek(data_start + offset * itemsize)
            buf = bytearray(numel * itemsize)
            raw.readinto(buf)
            src = torch.frombuffer(buf, dtype=dtype).view(size)
            if tuple(params[name].shape) != tuple(size):
                fail(f"{pth}: {name} has shape {list(size)}, the model expects {list(params[name].shape)}")
            with torch.no_grad():
                params[name].copy_(src)
            del buf, src


def load(ref, folder, max_batch_size, dtype, stream):
    with cuda_is_cpu_and_no_init():
        if not stream:
            model = ref.Transformer.from_folder(Path(folder), max_batch_size=max_batch_size, device="cpu", dtype=dtype)
        else:
            with open(Path(folder) / "params.json") as f:
                args = ref.ModelArgs(**json.load(f))
            args.max_batch_size = max_batch_size
            default = torch.get_default_dtype()
            torch.set_default_dtype(dtype)  # build the parameters in the checkpoint's dtype directly
            try:
                model = ref.Transformer(args).to(device="cpu", dtype=dtype)
            finally:
                torch.set_default_dtype(default)
            stream_into(model, Path(folder) / "consolidated.00.pth")
    cast_caches(model, dtype)
    return model


def convert(folder):
    """consolidated.safetensors (float32, as bench/common.ts writes it) -> consolidated.00.pth."""
    src = Path(folder) / "consolidated.safetensors"
    dst = Path(folder) / "consolidated.00.pth"
    if dst.exists():
        return
    data = src.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    start = 8 + length
    state = {}
    for name, info in header.items():
        if info["dtype"] != "F32":
            fail(f"{src}: {name} is {info['dtype']}, expected F32")
        begin, end = info["data_offsets"]
        array = np.frombuffer(data, dtype="<f4", count=(end - begin) // 4, offset=start + begin)
        state[name] = torch.from_numpy(array.copy()).view(info["shape"])
    torch.save(state, str(dst) + ".partial")
    os.replace(str(dst) + ".partial", dst)


# ----------------------------------------------------------------------------------------------
# Workloads (the port's, in bench/workloads.ts)


def prompt_ids(n, row=0, vocab=32000):
    return [(1 + (i + 31 * row) * 7919) % vocab for i in range(n)]


@torch.no_grad()
def greedy_step(model, ids, start):
    input_ids = torch.tensor(ids, dtype=torch.long)
    seqlen = input_ids.shape[1]
    logits = model.forward(input_ids, torch.arange(start, start + seqlen))
    return torch.argmax(logits[:, -1, :], dim=-1).tolist()


def fresh_caches(model):
    """The reference allocates its caches once; a run starts from empty ones, as the port's does."""
    for layer in model.layers:
        layer.attention.cache_k.zero_()
        layer.attention.cache_v.zero_()


def run_workloads(model, w):
    fresh_caches(model)
    t0 = time.perf_counter()
    nxt = greedy_step(model, [prompt_ids(w.prefill)], 0)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(w.decode):
        nxt = greedy_step(model, [nxt], w.prefill + i)
    decode_s = time.perf_counter() - t0
    batch_s = 0.0
    if w.batch > 0 and w.batch_decode > 0:
        fresh_caches(model)
        ids = greedy_step(model, [prompt_ids(w.batch_prefill, b) for b in range(w.batch)], 0)
        t0 = time.perf_counter()
        for j in range(w.batch_decode):
            ids = greedy_step(model, [[i] for i in ids], w.batch_prefill + j)
        batch_s = time.perf_counter() - t0
    cache_bytes = sum(l.attention.cache_k.numel() * l.attention.cache_k.element_size() * 2 for l in model.layers)
    return dict(prefillS=prefill_s, decodeS=decode_s, batchDecodeS=batch_s, kvCacheBytes=cache_bytes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--convert", metavar="DIR")
    ap.add_argument("--ref", default="/tmp/mistral-src-c18d5b9")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--batch-prefill", type=int, default=None)
    ap.add_argument("--batch-decode", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--stream", action="store_true")
    w = ap.parse_args()
    if w.convert:
        convert(w.convert)
        return
    if not w.model:
        fail("--model DIR is required")
    if w.batch_prefill is None:
        w.batch_prefill = w.prefill
    torch.set_num_threads(w.threads)
    ref = _import_reference(Path(w.ref), "as-written")
    dtype = DTYPES[w.dtype]

    # One model whose caches have a row per batch entry, as the reference allocates them (once, up
    # front): a batch-1 forward uses row 0 and costs the same as with a one-row cache.
    t0 = time.perf_counter()
    model = load(ref, w.model, max(1, w.batch), dtype, w.stream)
    load_s = time.perf_counter() - t0

    runs = []
    for r in range(w.reps):
        runs.append(run_workloads(model, w))
        print(f"reference rep {r + 1}/{w.reps}: prefill {runs[-1]['prefillS']:.2f} s, decode {runs[-1]['decodeS']:.2f} s, "
              f"batch {runs[-1]['batchDecodeS']:.2f} s", file=sys.stderr, flush=True)
    result = dict(
        side="reference",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        blas=_blas_info(),
        dtype=w.dtype,
        stream=w.stream,
        loadS=load_s,
        runs=runs,
        peakRssBytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        loadavg=list(os.getloadavg()),
    )
    print(RESULT_MARKER + json.dumps(result), flush=True)


def _blas_info():
    config = torch.__config__.show()
    for part in config.replace(",", "\n").splitlines():
        if "BLAS_INFO" in part:
            return part.strip()
    return "unknown"


if __name__ == "__main__":
    main()
