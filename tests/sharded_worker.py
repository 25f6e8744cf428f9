"""Run by tests/test_distributed.py under `mlx.launch --backend ring -n N`: load a folder
sharded over the ranks, read OUT/prompt.txt, write what this rank computed to OUT/rank{r}.json."""

import json
import sys

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

import clsa_mlx
from clsa_mlx.generate import stream_generate

folder, out = sys.argv[1:3]
prompt = open(f"{out}/prompt.txt").read()
group = mx.distributed.init()
model, tokenizer = clsa_mlx.load(folder, group=group)
tokens = tokenizer.encode(prompt)
logits = model(mx.array(tokens)[None])[0]
greedy = [r.token for r in stream_generate(model, tokenizer, tokens, max_tokens=24, group=group)]
mx.random.seed(group.rank())  # sampling starts from different states; stream_generate makes them one
sampled = [r.token for r in stream_generate(model, tokenizer, tokens, max_tokens=24, group=group,
                                            sampler=make_sampler(1.0))]
cache = model.make_cache()
model(mx.array(tokens)[None], cache=cache)
kv = cache[len(model.self_decoder.layers)]
result = dict(rank=group.rank(), size=group.size(), logits=logits.tolist(), greedy=greedy, sampled=sampled,
              kv_heads=kv.keys.shape[1], kv_bytes=kv.nbytes)
with open(f"{out}/rank{group.rank()}.json", "w") as f:
    json.dump(result, f)
