"""Why a batched greedy text can differ from the one-at-a-time text on a GPU: the smallest gap
between the top two log-probabilities of each one-at-a-time generation in tests/test_batch.py.
A gap below the device's rounding (fp32 matmuls run TF32 on the H200, about 1e-3) can flip.

    python benchmarks/diag_batch_tie.py [ARCH]
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import mlx.core as mx  # noqa: E402
from mlx_lm.generate import batch_generate, stream_generate  # noqa: E402
from mlx_lm.tokenizer_utils import TokenizerWrapper  # noqa: E402
from test_batch import ARCHS, prompts  # noqa: E402

from clsa_mlx.model import Model  # noqa: E402
from clsa_mlx.tiny import byte_tokenizer, tiny_args  # noqa: E402

arch = sys.argv[1] if len(sys.argv) > 1 else "yoco-swa"
mx.random.seed(3)  # the test's model
model = Model(tiny_args(**ARCHS[arch]))
mx.eval(model.parameters())
tok, ps = TokenizerWrapper(byte_tokenizer()), prompts()
batched = batch_generate(model, tok, ps, max_tokens=10, prefill_step_size=48).texts
for i, p in enumerate(ps):
    rs = list(stream_generate(model, tok, p, max_tokens=10))
    gaps = [float(mx.sort(r.logprobs)[-1] - mx.sort(r.logprobs)[-2]) for r in rs]
    same = batched[i] == tok.decode([r.token for r in rs])
    print(f"{arch} prompt {i}: batched {'equal' if same else 'DIFFERENT'}; smallest top-2 gap "
          f"{min(gaps):.2e} at step {gaps.index(min(gaps))}")
