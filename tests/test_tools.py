"""mlx-lm's other tools on our models, through their own entry points: LoRA training (with
adapters below the indexer, where routing must pass no gradient), fuse, adapters at load."""

import json
import subprocess
import sys

import pytest

import clsa_mlx
from clsa_mlx.tiny import make_tiny_folder

PROMPT = "The pass key is"


def mlx_lm(*args):
    r = subprocess.run([sys.executable, "-m", "mlx_lm", *map(str, args), "--trust-remote-code"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "You are using a model of type" not in r.stdout + r.stderr  # transformers' warning about our types
    return r.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    folder = make_tiny_folder(root / "m", seed=1)
    (root / "data").mkdir()
    rows = "\n".join(json.dumps({"text": "The pass key is 71942. Remember: the pass key is 71942."}) for _ in range(8))
    for split in ("train", "valid"):
        (root / "data" / f"{split}.jsonl").write_text(rows + "\n")
    # every layer, the self-decoder below the indexer too; ~55 tokens > top-k 8: routing runs
    mlx_lm("lora", "--model", folder, "--train", "--data", root / "data", "--iters", 12, "--num-layers", 4,
           "--batch-size", 2, "--learning-rate", 1e-2, "--adapter-path", root / "adapters", "--val-batches", 1)
    return root, folder


def greedy(model, tokenizer):
    return clsa_mlx.generate(model, tokenizer, PROMPT, max_tokens=12)


def test_lora_trains_below_the_indexer_and_adapters_load(trained):
    root, folder = trained
    base = greedy(*clsa_mlx.load(folder))
    tuned = greedy(*clsa_mlx.load(folder, adapter_path=root / "adapters"))
    assert tuned != base


def test_mlx_lm_fuse_gives_the_adapters_text(trained):
    root, folder = trained
    mlx_lm("fuse", "--model", folder, "--adapter-path", root / "adapters", "--save-path", root / "fused")
    assert (root / "fused" / "clsa_mlx_model.py").is_file()  # still runs in mlx-lm with no code of ours
    fused = greedy(*clsa_mlx.load(root / "fused"))
    assert fused == greedy(*clsa_mlx.load(folder, adapter_path=root / "adapters"))
    gen = lambda *extra: mlx_lm("generate", "--prompt", PROMPT, "--max-tokens", 12, *extra)  # noqa: E731
    assert gen("--model", root / "fused").split("==========")[1] == \
        gen("--model", folder, "--adapter-path", root / "adapters").split("==========")[1]
