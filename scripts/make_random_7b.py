#!/usr/bin/env python3
"""Writes a Mistral-7B-v0.1-shaped checkpoint with random weights, in the official folder format.

    /usr/bin/python3 scripts/make_random_7b.py OUT_DIR [--tokenizer PATH] [--tar]

OUT_DIR gets params.json (Mistral-7B-v0.1's), consolidated.00.pth (torch.save of a bf16 state
dict with the real names and shapes: 14.5 GB, a zip64 archive like the real file) and
tokenizer.model (copied from --tokenizer, by default ../shared/mistral-tokenizer/tokenizer.model.v1,
the genuine v0.1 tokenizer, which is not part of this project). With --tar, also OUT_DIR.tar holding
the folder, like the official mistral-7B-v0.1.tar.

The real weights cannot be downloaded where this project is developed; this file exercises the same
loading paths and memory at full size. Keep it outside git. Values: N(0, 0.02) drawn once into a
pool and tiled with shifting offsets (randomness per element does not matter here, speed does);
norm weights are 1.
"""
import argparse
import json
import shutil
import tarfile
from pathlib import Path

import torch

PARAMS = {
    "dim": 4096,
    "n_layers": 32,
    "head_dim": 128,
    "hidden_dim": 14336,
    "n_heads": 32,
    "n_kv_heads": 8,
    "norm_eps": 1e-05,
    "sliding_window": 4096,
    "vocab_size": 32000,
}


def shapes(p):
    d, hd, f, v = p["dim"], p["head_dim"], p["hidden_dim"], p["vocab_size"]
    q, kv = p["n_heads"] * hd, p["n_kv_heads"] * hd
    yield "tok_embeddings.weight", (v, d)
    for i in range(p["n_layers"]):
        pre = f"layers.{i}"
        yield f"{pre}.attention.wq.weight", (q, d)
        yield f"{pre}.attention.wk.weight", (kv, d)
        yield f"{pre}.attention.wv.weight", (kv, d)
        yield f"{pre}.attention.wo.weight", (d, q)
        yield f"{pre}.feed_forward.w1.weight", (f, d)
        yield f"{pre}.feed_forward.w2.weight", (d, f)
        yield f"{pre}.feed_forward.w3.weight", (f, d)
        yield f"{pre}.attention_norm.weight", (d,)
        yield f"{pre}.ffn_norm.weight", (d,)
    yield "norm.weight", (d,)
    yield "output.weight", (v, d)


def main():
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--tokenizer", type=Path, default=here.parent.parent / "shared" / "mistral-tokenizer" / "tokenizer.model.v1")
    ap.add_argument("--tar", action="store_true")
    args = ap.parse_args()

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(PARAMS, indent=4))
    shutil.copyfile(args.tokenizer, out / "tokenizer.model")

    g = torch.Generator().manual_seed(7)
    pool = (torch.randn(1 << 24, generator=g) * 0.02).to(torch.bfloat16)
    state = {}
    shift = 0
    for name, shape in shapes(PARAMS):
        n = 1
        for s in shape:
            n *= s
        if len(shape) == 1:
            state[name] = torch.ones(shape, dtype=torch.bfloat16)
            continue
        shift = (shift + 7919) % pool.numel()
        reps = (n + shift) // pool.numel() + 1
        state[name] = pool.repeat(reps)[shift : shift + n].view(shape).clone()
        print(name, shape, flush=True)
    torch.save(state, out / "consolidated.00.pth")
    if args.tar:
        with tarfile.open(str(out) + ".tar", "w") as tar:
            tar.add(out, arcname=out.name)
    print("wrote", out)


if __name__ == "__main__":
    main()
