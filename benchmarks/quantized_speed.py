"""The same weights stored quantized, run two ways on this machine: the quantized matmuls as
stored, and dequantized to fp16 at load (what `clsa_mlx.load` does where no GPU runs MLX).

    python benchmarks/quantized_speed.py [--model clsa_mlx/shipped] [--bits 8] [--prompt 1024] [--tokens 32]
        [--out benchmarks/results/quantized_speed.json]

The model is quantized here as convert.py -q does (mlx-lm's quantize_model, the indexer kept
in full precision); prefill tokens/s and decode tokens/s of each, and the fp16 model's.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
from mlx_lm.utils import dequantize_model, quantize_model  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from clsa_mlx import load_model  # noqa: E402
from clsa_mlx.generate import prefill  # noqa: E402


def speed(model, ids, tokens):
    cache = model.make_cache()
    mx.eval(model.parameters())
    t0 = time.perf_counter()
    prefill(model, ids[:-1], cache, 2048)
    logits = model(mx.array([ids[-1:]]), cache=cache)
    mx.eval(logits)
    t1 = time.perf_counter()
    for _ in range(tokens):
        logits = model(mx.argmax(logits[:, -1:], axis=-1), cache=cache)
        mx.eval(logits)
    t2 = time.perf_counter()
    return dict(prefill_tps=len(ids) / (t1 - t0), decode_tps=tokens / (t2 - t1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="clsa_mlx/shipped")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quantized_speed.json"))
    args = p.parse_args()
    ids = [int(i) for i in mx.random.randint(3, 8000, (args.prompt,), key=mx.random.key(0))]
    fp16 = load_model(args.model, fuse=False)
    quantized, _ = quantize_model(load_model(args.model, fuse=False), {}, 64, args.bits,
                                  quant_predicate=lambda path, m: ".indexer." not in f".{path}.")
    out = dict(machine=machine(), model=args.model, bits=args.bits, prompt=args.prompt, tokens=args.tokens,
               fp16=speed(fp16, ids, args.tokens), quantized=speed(quantized, ids, args.tokens))
    out["dequantized_at_load"] = speed(dequantize_model(quantized), ids, args.tokens)
    print(json.dumps({k: out[k] for k in ("fp16", "quantized", "dequantized_at_load")}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
