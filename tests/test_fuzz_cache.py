"""Saved caches fuzzed field by field (every metadata entry, every array's shape, dtype and value
of a scalar): a session file either loads into a state that answers exactly as the unedited file
does, or is refused with the session unchanged. Never a crash, never an accepted wrong state."""

import os

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import clsa_mlx
from clsa_mlx.cache_check import CacheError, check_cache, read_cache_file
from clsa_mlx.conversation import ChatError, Conversation, model_identity
from clsa_mlx.tiny import make_tiny_folder

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = [mx.float32, mx.float16, mx.bfloat16, mx.int32, mx.int64, mx.uint8, mx.bool_, mx.complex64]
NAMES = ["KVCache", "RotatingKVCache", "ArraysCache", "QuantizedKVCache", "CacheList", "ChunkedKVCache", "mx",
         "save_prompt_cache", "", "scalar", "string", "none", "1", "-1", "[]", "{}", "0.5"]


def _phi4flash():
    """A small Phi-4-mini-flash (Mamba states, windows of 8, one shared K/V) with the byte tokenizer."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from clsa_mlx.models import phi4flash as pf
    from clsa_mlx.tiny import byte_tokenizer

    mx.random.seed(0)
    model = pf.Model(pf.ModelArgs.from_dict(dict(
        model_type="phi4flash", vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, sliding_window=8, mamba_d_state=8, tie_word_embeddings=True)))
    mx.eval(model.parameters())
    return Conversation(model, TokenizerWrapper(byte_tokenizer()), "phi4flash")


@pytest.fixture(scope="module", params=["swa", "gated_retention", "phi4flash"])
def sessions(request, tmp_path_factory):
    """A conversation and its session files: a short one (window not yet full) and a long one
    (rotated by one-token steps); each with the greedy reply it gives to the next question."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "phi4flash":
        conv = _phi4flash()
    else:
        window = dict(sliding_window=16) if request.param == "swa" else dict(sliding_window=None)
        folder = make_tiny_folder(tmp / "m", **window)
        model, tokenizer = clsa_mlx.load(folder)
        conv = Conversation(model, tokenizer, model_identity(folder), model_path=folder)
    files = {}
    for name, question in (("short", "Hi"), ("long", "What does the routing do? " * 3)):
        conv.reset()
        list(conv.ask(question, max_tokens=6))
        files[name] = conv.save(str(tmp / name))
    return conv, {name: (path, _reply(conv, path)) for name, path in files.items()}


def _reply(conv, path):
    conv.load(path)
    return list(conv.ask("and then?", max_tokens=3)), conv.used


def _state(conv):
    return list(conv.messages), list(conv.ids), conv.text_in_cache, conv.cache


def _mutated(path, out, data):
    arrays, meta = mx.load(path, return_metadata=True)
    what = data.draw(st.sampled_from(["meta", "nest", "array", "scalar", "drop", "extra"]))
    if what == "nest":  # a name where mlx-lm keeps a value: the reader meets a list or a dict
        key = data.draw(st.sampled_from(sorted(meta)))
        meta[key + data.draw(st.sampled_from([".0", ".x", ".0.0"]))] = meta.pop(key)
    elif what == "meta":
        # the cache's own entries (the session's texts have their fuzzer in test_hostile.py)
        key = data.draw(st.sampled_from(sorted(k for k in meta if not k.startswith("0.")
                                               or k[2:] in ("ids", "key", "model_id", "clsa_mlx_session"))))
        value = data.draw(st.sampled_from(NAMES) | st.text(max_size=8) | st.none())
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    elif what in ("array", "drop"):
        key = data.draw(st.sampled_from(sorted(arrays)))
        a = arrays[key]
        if what == "drop":
            arrays.pop(key)
        elif a.ndim and data.draw(st.booleans()):  # another shape: rows cut or added on one axis, or an axis more
            axis = data.draw(st.integers(0, a.ndim - 1))
            n = a.shape[axis] + data.draw(st.integers(-3, 3).filter(bool))
            assume(n >= 0)
            shape = list(a.shape)
            shape[axis] = n
            b = mx.zeros(shape, a.dtype)
            b[tuple(slice(0, min(x, y)) for x, y in zip(a.shape, shape))] = \
                a[tuple(slice(0, min(x, y)) for x, y in zip(a.shape, shape))]
            arrays[key] = b[None] if data.draw(st.booleans()) and a.ndim < 5 else b
        else:
            arrays[key] = a.astype(data.draw(st.sampled_from(DTYPES)))
    elif what == "scalar":
        key = data.draw(st.sampled_from(sorted(k for k, a in arrays.items() if a.ndim == 0)))
        value = data.draw(st.integers(-2**40, 2**40) | st.integers(-3, 300) | st.floats(allow_nan=True)
                          | st.booleans() | st.complex_numbers(max_magnitude=1e3))
        arrays[key] = mx.array(value)
    else:
        arrays[data.draw(st.sampled_from(["9.0", "0.9", "0.0.0", "x"]))] = mx.zeros((1, 2, 3, 4))
    try:
        mx.save_safetensors(str(out), arrays, metadata=meta)
    except Exception:  # a dtype safetensors cannot hold
        assume(False)
    return str(out)


@FUZZ
@given(data=st.data(), which=st.sampled_from(["short", "long"]))
def test_fuzzed_session_caches_load_exactly_or_are_refused(sessions, tmp_path, data, which):
    conv, files = sessions
    path, (want, used) = files[which]
    conv.load(path)
    before = _state(conv)
    bad = _mutated(path, tmp_path / "fuzzed.safetensors", data)
    try:
        conv.load(bad)
    except ChatError as e:
        assert "session unchanged" in str(e) and "\n" not in str(e)
        assert _state(conv) == before
        event("refused")
        return
    event("accepted")
    assert list(conv.ask("and then?", max_tokens=3)) == want and conv.used == used


def test_every_cache_is_checked_against_the_others(sessions, tmp_path):
    """The edits that reached the model before the check compared caches with each other."""
    from mlx_lm.models.cache import save_prompt_cache

    conv, files = sessions
    path = files["long"][0]
    n = len(conv.model.self_decoder.layers)
    grow = lambda c, k: mx.concatenate([c, mx.zeros((*c.shape[:2], k, c.shape[3]), c.dtype)], axis=2)  # noqa: E731
    edits = {
        "an index cache longer than the K/V": lambda c: (setattr(c[-1], "keys", grow(c[-1].keys, 3000)),
                                                        setattr(c[-1], "values", grow(c[-1].values, 3000)),
                                                        setattr(c[-1], "offset", c[-1].offset + 3000)),
        "a window cache ahead of the K/V": lambda c: setattr(c[0], "offset", c[0].offset + 1),
        "a float offset": lambda c: setattr(c[n], "offset", float(c[n].offset)),
        "a float window size": lambda c: setattr(c[0], "max_size", float(getattr(c[0], "max_size", 1))),
        "keys of another dtype": lambda c: setattr(c[n], "keys", c[n].keys.astype(mx.float16)),
    }
    for name, edit in edits.items():
        cache, meta = read_cache_file(path)
        if name.startswith("a window") or name.startswith("a float window"):
            if not hasattr(cache[0], "max_size"):
                continue
        edit(cache)
        with pytest.raises(CacheError):
            check_cache(conv.model, cache)
        save_prompt_cache(str(tmp_path / "bad.safetensors"), cache, meta)
        before = _state(conv)
        with pytest.raises(ChatError, match="session unchanged"):
            conv.load(str(tmp_path / "bad.safetensors"))
        assert _state(conv) == before, name


def test_a_prompt_cache_file_reaching_the_model_through_mlx_lm_is_checked(sessions, tmp_path):
    """`mlx_lm generate --trust-remote-code --prompt-cache-file` hands the file's caches to the
    model built from the folder's model_file: an index cache longer than the K/V segfaulted there."""
    from mlx_lm.models.cache import load_prompt_cache
    from mlx_lm.utils import load_model

    conv, files = sessions
    if conv.model_path is None:
        pytest.skip("no model folder")
    model, _ = load_model(conv.model_path, trust_remote_code=True)
    assert type(model).__module__ != "clsa_mlx.model"  # the model_file's class
    good = load_prompt_cache(files["long"][0])
    model(mx.array([[5]]), cache=good)  # a plain, valid cache runs
    bad = load_prompt_cache(files["long"][0])
    bad[-1].keys = mx.concatenate([bad[-1].keys, mx.zeros((1, 1, 3000, bad[-1].keys.shape[3]))], axis=2)
    bad[-1].values = mx.zeros((1, 1, bad[-1].keys.shape[2], 0))
    bad[-1].offset += 3000
    with pytest.raises(CacheError, match="offset"):
        model(mx.array([[5]]), cache=bad)


@pytest.fixture(scope="module")
def document_entry(tmp_path_factory):
    """A document-cache entry of a short document (the size floor lowered), and the reply a
    conversation that starts from it gives."""
    from clsa_mlx import prefix_cache

    tmp = tmp_path_factory.mktemp("doc")
    model = clsa_mlx.load(make_tiny_folder(tmp / "m"))
    doc = tmp / "doc.txt"
    doc.write_text("The value of key bada-ko is 12345. " * 4)
    floor, prefix_cache.MIN_TOKENS = prefix_cache.MIN_TOKENS, 16
    try:
        conv = Conversation(*model, "tiny", prefixes=prefix_cache.PrefixCache("tiny", tmp / "c"))
        conv.add_document(str(doc))
        (entry,) = (tmp / "c").glob("*.clsa-document.safetensors")
        want = list(conv.ask("What is the value?", max_tokens=3))
        yield model, doc, entry, entry.read_bytes(), want
    finally:
        prefix_cache.MIN_TOKENS = floor


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_document_cache_entries_are_reused_exactly_or_prefilled_again(document_entry, tmp_path, data):
    from clsa_mlx.prefix_cache import PrefixCache

    model, doc, entry, pristine, want = document_entry
    entry.write_bytes(pristine)
    bad = _mutated(str(entry), tmp_path / "fuzzed.safetensors", data)
    os.replace(bad, entry)
    conv = Conversation(*model, "tiny", prefixes=PrefixCache("tiny", entry.parent))
    conv.add_document(str(doc))
    event("reused" if conv.reused else "prefilled again")
    assert list(conv.ask("What is the value?", max_tokens=3)) == want
