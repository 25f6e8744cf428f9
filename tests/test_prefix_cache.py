"""Prefilled documents reused by the next conversation (in memory and on disk), exactly."""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from clsa_mlx import load
from clsa_mlx.conversation import Conversation
from clsa_mlx.prefix_cache import MIN_TOKENS, PrefixCache
from clsa_mlx.tiny import make_tiny_folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(make_tiny_folder(tmp_path_factory.mktemp("pc") / "m", index_topk=8, sliding_window=16))


@pytest.fixture
def doc(tmp_path):
    p = tmp_path / "long.txt"
    p.write_text("The value of key bada-ko is 12345. " * (MIN_TOKENS // 30 + 10))
    return p


def fresh(model, folder, **kw):
    m, t = model
    return Conversation(m, t, "tiny", prefill_step=512, prefixes=PrefixCache("tiny", folder, **kw))


def counted():
    calls = []
    return calls, lambda done, total: calls.append(done)


def test_a_document_prefilled_once_starts_the_next_conversations_without_prefill(model, doc, tmp_path):
    first = fresh(model, tmp_path / "cache")
    n = first.add_document(str(doc))
    assert n >= MIN_TOKENS and not first.reused and list((tmp_path / "cache").glob("tiny-*.safetensors"))
    want = "".join(first.ask("What is the value of key bada-ko?", max_tokens=8))
    for how in ("memory", "disk"):  # the same cache object (this process), a new one (a restart)
        conv = first if how == "memory" else fresh(model, tmp_path / "cache")
        if how == "memory":
            conv.reset()
        calls, progress = counted()
        assert conv.add_document(str(doc), progress=progress) == n and conv.reused and calls == []
        assert conv.used == len(conv.ids) == n
        assert "".join(conv.ask("What is the value of key bada-ko?", max_tokens=8)) == want


def test_the_reused_cache_is_a_copy(model, doc, tmp_path):
    a, b = fresh(model, tmp_path / "c"), fresh(model, None)
    a.add_document(str(doc))
    "".join(a.ask("first question", max_tokens=4))
    a.reset()
    a.add_document(str(doc))  # from memory: the first conversation's turns did not leak into it
    b.add_document(str(doc))
    assert a.reused and a.used == b.used
    for x, y in zip(a.cache, b.cache):  # the rows each holds (a global cache's buffer may be reserved longer)
        n = x.offset if isinstance(x, KVCache) else None
        assert mx.array_equal(x.keys[..., :n, :], y.keys[..., :n, :]) and mx.array_equal(x.values[..., :n, :], y.values[..., :n, :])


def test_a_broken_file_is_removed_and_the_document_prefilled_again(model, doc, tmp_path):
    fresh(model, tmp_path / "c").add_document(str(doc))
    (path,) = (tmp_path / "c").glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:200])
    conv = fresh(model, tmp_path / "c")
    calls, progress = counted()
    conv.add_document(str(doc), progress=progress)
    assert not conv.reused and calls and path.is_file() and path.stat().st_size > 200


def test_the_folder_stays_within_its_size(model, tmp_path):
    conv = fresh(model, tmp_path / "c", max_gb=1.5e-3)  # 1.5 MB: about two of these documents
    for i in range(4):
        d = tmp_path / f"d{i}.txt"
        d.write_text(f"Document {i}. " + "The value of key bada-ko is 12345. " * (MIN_TOKENS // 30 + 10))
        conv.reset()
        conv.add_document(str(d))
    files = list((tmp_path / "c").glob("*.safetensors"))
    assert 1 <= len(files) < 4 and sum(f.stat().st_size for f in files) <= 1.5e6


def test_only_a_conversations_start_is_kept(model, doc, tmp_path):
    conv = fresh(model, tmp_path / "c")
    "".join(conv.ask("hello", max_tokens=4))
    conv.add_document(str(doc))  # after a turn: the prefix holds the turn, which does not repeat
    assert not conv.reused and not list((tmp_path / "c").glob("*.safetensors")) and not conv.prefixes.memory
