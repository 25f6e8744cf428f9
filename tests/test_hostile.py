"""Hostile and broken inputs, by class: crafted pickles (BUILD on what the reader hands out,
numpy dtypes and scalars, allocations), compressed archives, shard and tokenizer paths out of
the source folder, configs, token ids. Each gets one line naming the problem; nothing crashes,
runs, allocates past the file or changes what a later file reads. Fuzzed with hypothesis."""

import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from convert_fixtures import ROOT, make_model, write_hf, write_official, write_tokenizer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import clsa_mlx
from clsa_mlx import torch_pickle
from clsa_mlx.config import ModelArgs
from clsa_mlx.convert import ConvertError, convert
from clsa_mlx.generate import stream_generate
from clsa_mlx.layouts import params_to_args
from clsa_mlx.tiny import make_tiny_folder

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---- a few pickle opcodes, to write what no pickler would ----------------------------

def G(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def S(text):
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def I(n):  # noqa: E743
    return b"J" + struct.pack("<i", n)


def B(data):
    return b"C" + bytes([len(data)]) + data


def T(*items):
    return b"(" + b"".join(items) + b"t"


def D(**items):
    return b"}(" + b"".join(S(k) + v for k, v in items.items()) + b"u"


def call(fn, *args):
    return fn + T(*args) + b"R"


def pkl(body):
    return b"\x80\x03" + body + b"."


N = b"N"
DTYPE_F8 = call(G("numpy", "dtype"), S("f8"), b"\x89", b"\x88")


def torch_file(path, payload=None, compress=None):
    """A real torch.save file of one tensor, its data.pkl replaced by `payload` and its entries
    written with `compress` (torch.save stores them)."""
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    if payload is not None:
        entries[next(n for n in entries if n.endswith("data.pkl"))] = payload
    with zipfile.ZipFile(path, "w", compression=compress or zipfile.ZIP_STORED) as z:
        for n, data in entries.items():
            z.writestr(n, data)
    return path


def refused(path, match, kind=torch_pickle.UnsafePickleError):
    with pytest.raises(kind, match=match) as e:
        torch_pickle.load(path)
    assert "\n" not in str(e.value) and len(str(e.value)) < 600
    return e.value


# ---- the reader ---------------------------------------------------------------------

def test_numpy_dtype_given_fields_by_build_is_refused(tmp_path):
    # dtype('f8') + BUILD with names/fields: a dtype reading outside its buffer (segfault before)
    state = T(I(3), S("|"), N, T(S("a")), D(a=T(DTYPE_F8, I(10**6))), I(8), I(1), I(0))
    path = torch_file(tmp_path / "f.pth", pkl(call(G("numpy.core.multiarray", "scalar"), DTYPE_F8 + state + b"b", B(b"\0" * 8))))
    refused(path, "numpy dtype state with fields")


@pytest.mark.parametrize("data", [b"\0" * 2, b"\0" * 9])
def test_numpy_scalar_of_the_wrong_size_is_refused(tmp_path, data):
    path = torch_file(tmp_path / "s.pth", pkl(call(G("numpy.core.multiarray", "scalar"), DTYPE_F8, B(data))))
    refused(path, "wrong size")


def test_plain_numpy_scalars_and_namespaces_still_load(tmp_path):
    import argparse

    torch.save({"f": np.float64(0.5), "i": np.int32(7), "a": argparse.Namespace(lr=0.1)}, tmp_path / "ok.pt")
    got = torch_pickle.load(tmp_path / "ok.pt")
    assert got["f"] == 0.5 and got["i"] == 7 and got["a"].lr == 0.1


@pytest.mark.parametrize("target", [("torch", "FloatStorage"), ("torch", "float32"), ("torch", "Tensor"),
                                    ("argparse", "Namespace"), ("collections", "OrderedDict"),
                                    ("torch._utils", "_rebuild_tensor_v2")])
def test_build_on_what_the_reader_hands_out_is_refused_and_poisons_nothing(tmp_path, target):
    before = {k: (v, dict(getattr(v, "__dict__", {}))) for k, v in torch_pickle._ALLOWED.items()}
    evil = pkl(G(*target) + b"}" + S("dtype") + S("int64") + b"s" + b"b")
    refused(torch_file(tmp_path / "evil.pth", evil), "sets the state of")
    assert {k: (v, dict(getattr(v, "__dict__", {}))) for k, v in torch_pickle._ALLOWED.items()} == before
    clean = torch_pickle.load(torch_file(tmp_path / "clean.pth"))  # a later file reads as it should
    assert clean["w"].dtype == "float32" and clean["w"].array.tolist() == [0, 1, 2, 3]


def test_bytearray_of_a_size_is_refused_before_allocating(tmp_path):
    path = torch_file(tmp_path / "b.pth", pkl(call(G("builtins", "bytearray"), I(2**30))))
    refused(path, "bytearray of something other than bytes")


@pytest.mark.parametrize("compress", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2])
def test_compressed_entries_are_refused(tmp_path, compress):
    refused(torch_file(tmp_path / "z.pth", compress=compress), "compressed or encrypted", torch_pickle.TorchFormatError)


def test_a_huge_global_name_is_cut_in_the_error(tmp_path):
    err = refused(torch_file(tmp_path / "n.pth", pkl(G("os", "x" * 4_000_000))), "refusing to load")
    assert len(str(err)) < 600


ATOMS = [G(m, n) for m, n in torch_pickle._ALLOWED] + [
    G("os", "system"), S("f8"), S("|"), S("little"), I(0), I(3), I(-1), I(2**30), B(b"\0" * 8), N, b"\x88", b"\x89",
    b"(", b"t", b"R", b"b", b"}", b"s", b"u", b"]", b"a", b"e", b"0", b"2", b"q\x00", b"h\x00", b")",
]


@FUZZ
@given(st.lists(st.sampled_from(ATOMS), max_size=30))
def test_fuzzed_opcode_streams_raise_only_format_errors(tmp_path, atoms):
    snapshot = {k: dict(getattr(v, "__dict__", {})) for k, v in torch_pickle._ALLOWED.items()}
    path = torch_file(tmp_path / "fz.pth", pkl(b"".join(atoms)))
    try:
        torch_pickle.load(path)
    except torch_pickle.TorchFormatError as e:
        assert "\n" not in str(e) and len(str(e)) < 600
    assert {k: dict(getattr(v, "__dict__", {})) for k, v in torch_pickle._ALLOWED.items()} == snapshot


@FUZZ
@given(st.data())
def test_fuzzed_bytes_of_a_real_checkpoint_raise_only_format_errors(tmp_path, data):
    src = torch_file(tmp_path / "real.pth")
    raw = bytearray(src.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(len(raw) // 2, len(raw)))
    (tmp_path / "m.pth").write_bytes(bytes(raw[:cut]))
    try:
        for v in torch_pickle.load(tmp_path / "m.pth").values():
            v.to_mlx() if isinstance(v, torch_pickle.TensorData) else None
    except torch_pickle.TorchFormatError as e:
        assert "\n" not in str(e)
    except AttributeError:  # the pickle made something that is not a dict: convert.py reports that
        pass


# ---- paths out of the source folder ---------------------------------------------------

def test_shard_index_naming_files_outside_the_folder_is_refused(tmp_path):
    model, args = make_model("swa-clsa")
    src = write_hf(model, args, tmp_path / "src", "safetensors", "fla", shards=2)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "elsewhere").mkdir()
    os.replace(src / shard, tmp_path / "elsewhere" / shard)
    for name in (f"../elsewhere/{shard}", str(tmp_path / "elsewhere" / shard)):
        index["weight_map"] = {k: (name if v == shard else v) for k, v in index["weight_map"].items()}
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(ConvertError, match="resolves outside the folder"):
            convert(str(src), str(tmp_path / "out"), progress=False)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))


def test_tokenizer_file_linked_out_of_the_folder_is_not_copied(tmp_path):
    model, args = make_model("retention-dense", vocab_size=259)
    src = write_official(model, args, tmp_path / "src")
    (tmp_path / "secret.txt").write_text("ssh key")
    (src / "tokenizer.json").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(ConvertError, match="tokenizer file .*resolves outside the folder"):
        convert(str(src), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))


# ---- vocabulary and token ids ----------------------------------------------------------

def test_tokenizer_larger_than_the_model_is_refused_by_convert_and_load(tmp_path):
    model, args = make_model("retention-dense")  # 97 tokens
    src = write_official(model, args, tmp_path / "src")
    write_tokenizer(src)  # 259
    with pytest.raises(ConvertError, match="tokenizer hands out ids up to 258 but the model's vocab_size is 97"):
        convert(str(src), str(tmp_path / "out"), progress=False)
    folder = make_tiny_folder(tmp_path / "tiny", vocab_size=100)
    with pytest.raises(ValueError, match="tokenizer hands out ids up to 258 but the model's vocab_size is 100"):
        clsa_mlx.load(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return clsa_mlx.load(make_tiny_folder(tmp_path_factory.mktemp("t")))


@pytest.mark.parametrize("bad", [259, 10**9, -1, 2.5, True])
def test_token_ids_outside_the_vocabulary_are_refused(tiny, bad):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"prompt token 1: .* is not a token id of this model \(0\.\.258\)"):
        next(stream_generate(model, tokenizer, [5, bad, 6], max_tokens=2))
    with pytest.raises(ValueError, match="is not a token id"):
        next(stream_generate(model, tokenizer, mx.array([5, bad, 6]) if isinstance(bad, int) and abs(bad) < 2**31
                             and not isinstance(bad, bool) else [bad], max_tokens=2))



@pytest.mark.parametrize("prompt", [[5, 10**8, 6], [5, -1, 6], [10**8]])
def test_mlx_lms_own_loops_refuse_ids_outside_the_vocabulary(tiny, prompt):
    # a segfault before: MLX's gather reads outside the embedding
    from mlx_lm import batch_generate, generate

    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"token id -?\d+ is outside the vocabulary \(0\.\.258\)"):
        generate(model, tokenizer, prompt, max_tokens=2)
    with pytest.raises(ValueError, match="is outside the vocabulary"):
        batch_generate(model, tokenizer, [[5, 6, 7], prompt], max_tokens=2)
    assert generate(model, tokenizer, [5, 6, 7], max_tokens=2) is not None  # the model is still fine


def test_decode_steps_clamp_instead_of_reading_outside_the_embedding(tiny):
    model, _ = tiny
    cache = model.make_cache()
    model(mx.array([[5, 6, 7]]), cache=cache)
    mx.eval(model(mx.array([[10**8]]), cache=cache))  # a decode step: no sync to check, no crash


# ---- configs --------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,message", [
    ("rope_theta", 0, "rope_theta must be a positive finite number"),
    ("n_self_heads", 0, "n_self_heads must be an integer from 1 to"),
    ("dim", "64", "dim must be an integer from 1 to 16777216, got '64'"),
    ("index_head_dim", 2**31, "index_head_dim must be an integer from 1 to 16777216, got 2147483648"),
    ("model_type", "llama", "model_type must be 'clsa' or 'yoco'"),
    ("norm_eps", float("nan"), "norm_eps must be a positive finite number"),
    ("sliding_window", -4, "sliding_window must be a positive integer or null"),
    ("qk_norm", "yes", "qk_norm must be true or false"),
])
def test_bad_config_values_are_named(key, value, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs(**{key: value})


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=6)
PARAMS = dict(dim=64, n_layers=4, hidden_dim=128, n_self_heads=4, n_attn_heads=4, n_attn_kv_heads=2, vocab_size=97)


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted({*PARAMS, "rope_theta", "norm_eps", "sliding_window", "index_topk",
                                                   "index_head_dim", "max_seq_len", "gate_logit_normalizer"})),
                       JSON, min_size=1, max_size=3))
def test_fuzzed_params_give_a_model_or_one_line(changes):
    try:
        args = params_to_args({**PARAMS, **changes}, "params.json")
    except ConvertError as e:
        assert str(e).startswith("params.json: ") and "\n" not in str(e)
        return
    assert args.dim % args.n_attn_heads == 0 and args.rope_theta > 0


def test_broken_folders_fail_to_load_with_one_line_naming_the_folder(tmp_path):
    folder = make_tiny_folder(tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=str(folder)):
        clsa_mlx.load(folder)
    folder = make_tiny_folder(tmp_path / "t")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=str(folder)) as e:
        clsa_mlx.load(folder)
    assert "\n" not in str(e.value)


def test_convert_cli_exits_1_with_one_line_for_a_crafted_pickle(tmp_path):
    model, args = make_model("retention-dense")
    src = write_official(model, args, tmp_path / "src")
    evil = pkl(G("torch", "FloatStorage") + b"}" + S("dtype") + S("int64") + b"s" + b"b")
    torch_file(src / "checkpoint.pth", evil)
    r = subprocess.run([sys.executable, str(ROOT / "convert.py"), "--torch-path", str(src), "--mlx-path",
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "sets the state of" in r.stderr
    assert not (tmp_path / "out").exists()


def _pickle_of(path, patch):
    """A torch.save file of one 4-element tensor with its data.pkl bytes patched."""
    torch_file(path)
    with zipfile.ZipFile(path) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    name = next(n for n in entries if n.endswith("data.pkl"))
    return torch_file(path, patch(entries[name]))


BIG = b"J" + (2**28).to_bytes(4, "little")  # BININT 2**28: a 1 GB fp32 view
SIZE_AT, STRIDE_AT = 112, 117  # where torch.save writes the one size and stride of a 4-element tensor


def _amplifiers():
    """Files that once turned a few bytes into GBs: name -> (writer, expected message)."""
    def zeros_compressed(path):
        torch.save({"w": torch.zeros(2**26)}, path)  # 256 MB, then deflated to ~250 KB
        with zipfile.ZipFile(path) as z:
            entries = {i.filename: z.read(i) for i in z.infolist()}
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for n, data in entries.items():
                z.writestr(n, data)

    return {
        "stride-0 view": (lambda p: _pickle_of(p, lambda d: d[:SIZE_AT] + BIG + d[SIZE_AT + 2:STRIDE_AT] + b"K\0"
                                               + d[STRIDE_AT + 2:]), "refusing to expand it"),
        "view past its storage": (lambda p: _pickle_of(p, lambda d: d[:SIZE_AT] + BIG + d[SIZE_AT + 2:]),
                                  "but the storage holds 4"),
        "deflated zeros": (zeros_compressed, "compressed or encrypted"),
        "bytearray of a size": (lambda p: torch_file(p, pkl(call(G("builtins", "bytearray"), I(2**30)))),
                                "bytearray of something other than bytes"),
    }


# Reads every tensor's values in a fresh process, which reports its own high-water mark
# (ru_maxrss would count the parent's memory at the fork).
READ_ALL = """import sys
from clsa_mlx import torch_pickle
try:
    obj = torch_pickle.load(sys.argv[1])
    print("read", sum(v.to_mlx().nbytes for v in obj.values()))
except (torch_pickle.TorchFormatError, torch_pickle.UnsafePickleError) as e:
    print("refused", e)
print(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
"""


def _read_peak_mb(path):
    r = subprocess.run([sys.executable, "-c", READ_ALL, str(path)], capture_output=True, text=True, check=True)
    *out, peak = r.stdout.strip().splitlines()
    return "\n".join(out), int(peak) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak from /proc")
def test_amplifying_files_are_refused_within_the_memory_of_a_clean_read(tmp_path):
    out, baseline = _read_peak_mb(torch_file(tmp_path / "clean.pth"))
    assert out == "read 16"
    for name, (write, message) in _amplifiers().items():
        path = tmp_path / f"{name.replace(' ', '-')}.pth"
        write(path)
        out, peak = _read_peak_mb(path)
        assert out.startswith("refused") and message in out and "\n" not in out, (name, out)
        assert peak < baseline + 64, (name, peak, baseline)  # each one would take >= 256 MB more


# ---- weights ----------------------------------------------------------------------------

def test_huge_names_from_a_file_are_cut_in_the_error_line(tmp_path):
    model, args = make_model("retention-dense")
    name = "x" * 4_000_000
    src = write_official(model, args, tmp_path / "params")
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, name: 1}))
    hf = write_hf(model, args, tmp_path / "hf")
    weights = mx.load(str(hf / "model.safetensors"))
    mx.save_safetensors(str(hf / "model.safetensors"), {**weights, name: mx.zeros(1)})
    for folder, why in ((src, "unknown key"), (hf, "unexpected tensor")):
        with pytest.raises(ConvertError) as e:
            convert(str(folder), str(tmp_path / "out"), progress=False)
        line = str(e.value)
        assert len(line) < 700 and "\n" not in line and str(folder) in line and why in line and "characters cut" in line


def test_overlapping_safetensors_offsets_are_refused_by_convert_and_load(tmp_path):
    model, args = make_model("swa-clsa", vocab_size=259)
    src = write_hf(model, args, tmp_path / "src", "safetensors", "fla")
    f = src / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]  # two tensors, one buffer
    h = json.dumps(header).encode().ljust(n)
    f.write_bytes(raw[:8] + h + raw[8 + n:])
    with pytest.raises(ConvertError, match="not a valid safetensors file"):
        convert(str(src), str(tmp_path / "out"), progress=False)
    folder = make_tiny_folder(tmp_path / "tiny")
    (folder / "model.safetensors").write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="model.safetensors: not a valid safetensors file"):
        clsa_mlx.load(folder)



SAFETENSORS_DTYPES = ["F32", "F16", "BF16", "I32", "I64", "U8", "BOOL", "F64", "X9"]
HEADER_VALUE = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(SAFETENSORS_DTYPES) | st.integers(),
    "shape": st.lists(st.integers(-2, 2**40), max_size=3) | st.text(max_size=3),
    "data_offsets": st.lists(st.integers(-5, 2**40), max_size=3) | st.text(max_size=3),
})


@FUZZ
@given(st.dictionaries(st.text(min_size=1, max_size=6) | st.just("embed_tokens.weight"), HEADER_VALUE, max_size=3),
       st.integers(0, 64))
def test_fuzzed_safetensors_headers_give_one_line(tmp_path, header, data_len):
    folder = tmp_path / "hf"
    if not folder.exists():
        model, args = make_model("retention-dense")
        write_hf(model, args, folder, names="official")
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)
    with pytest.raises(ConvertError) as e:
        convert(str(folder), str(tmp_path / "out"), progress=False)
    assert "\n" not in str(e.value) and len(str(e.value)) < 700
    with pytest.raises(ValueError) as e:
        clsa_mlx.load(folder)
    assert "\n" not in str(e.value) and len(str(e.value)) < 700

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_unless_allowed(tmp_path, value):
    model, args = make_model("retention-dense")
    with torch.no_grad():
        model.layer_norm.weight[3] = value
    src = write_official(model, args, tmp_path / "src")
    with pytest.raises(ConvertError, match="tensor layer_norm.weight holds NaN or Inf"):
        convert(str(src), str(tmp_path / "out"), progress=False)
    assert convert(str(src), str(tmp_path / "out"), progress=False, allow_non_finite=True).is_dir()


def test_integer_tensors_are_refused_at_load(tmp_path):
    folder = make_tiny_folder(tmp_path / "m")
    weights = mx.load(str(folder / "model.safetensors"))
    weights["layer_norm.weight"] = weights["layer_norm.weight"].astype(mx.int32)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    with pytest.raises(ValueError, match="tensor layer_norm.weight has dtype mlx.core.int32, not a floating-point"):
        clsa_mlx.load(folder)


def test_sigterm_mid_conversion_leaves_nothing_and_stale_partials_are_removed(tmp_path, monkeypatch):
    import signal

    from click.testing import CliRunner

    import clsa_mlx.convert as conv
    from convert import main as cli

    model, args = make_model("retention-dense")
    src = write_official(model, args, tmp_path / "src")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}"
    stale.mkdir()
    real = conv.save_model

    def killed(*a, **kw):
        real(*a, **kw)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(conv, "save_model", killed)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        r = CliRunner().invoke(cli, ["--torch-path", str(src), "--mlx-path", str(tmp_path / "out")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert r.exit_code == 130 and "interrupted; nothing was written" in r.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))


# ---- chat session files -------------------------------------------------------------------

@pytest.fixture
def conversation(tmp_path):
    from clsa_mlx.conversation import Conversation, model_identity

    folder = make_tiny_folder(tmp_path / "m")
    model, tokenizer = clsa_mlx.load(folder)
    conv = Conversation(model, tokenizer, model_identity(folder))
    list(conv.ask("What does the routing do? " * 3, max_tokens=6))
    return conv


def _edit(path, out, meta):
    """A copy of a session file with metadata fields replaced (None: removed)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    prefix = next(k for k in metadata if k.endswith(".clsa_mlx_session"))[: -len("clsa_mlx_session")]
    metadata.update({prefix + k: v for k, v in meta.items()})  # save_prompt_cache's flattened layout
    mx.save_safetensors(str(out), mx.load(str(path)), metadata={k: v for k, v in metadata.items() if v is not None})
    return str(out)


def test_save_never_loses_the_conversation_nor_overwrites_other_files(conversation, tmp_path):
    from clsa_mlx.conversation import ChatError

    before = (list(conversation.messages), conversation.used)
    with pytest.raises(ChatError, match="cannot write .*the conversation is unchanged"):
        conversation.save(str(tmp_path / "missing" / "folder" / "s"))
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    with pytest.raises(ChatError, match="exists and is not a clsa-mlx session; not overwriting it"):
        conversation.save(str(weights))
    assert weights.read_bytes() == data and (list(conversation.messages), conversation.used) == before
    saved = conversation.save(str(tmp_path / "s"))
    assert conversation.save(saved) == saved  # a session file may be replaced
    assert not list(tmp_path.glob("*partial*"))


def test_load_checks_everything_before_replacing_anything(conversation, tmp_path):
    from clsa_mlx.conversation import ChatError

    saved = conversation.save(str(tmp_path / "s"))
    cases = {
        "messages not a list": {"messages": json.dumps({"a": 1})},
        "a message role": {"messages": json.dumps([{"role": "system", "content": "x"}] * 2)},
        "ids out of the vocabulary": {"ids": json.dumps([10**6] * len(conversation.ids))},
        "text_in_cache missing": {"text_in_cache": None},
        "ids shorter than the cache": {"ids": json.dumps(conversation.ids[:-1])},
        "documents not texts": {"documents": json.dumps([1])},
    }
    state = (list(conversation.messages), conversation.used, conversation.text_in_cache, conversation.cache)
    conversation.load(_edit(saved, tmp_path / "same.safetensors", {}))  # the unedited copy loads
    state = (list(conversation.messages), conversation.used, conversation.text_in_cache, conversation.cache)
    for name, edit in cases.items():
        bad = _edit(saved, tmp_path / f"{name}.safetensors", edit)
        with pytest.raises(ChatError, match="session unchanged"):
            conversation.load(bad)
        assert (list(conversation.messages), conversation.used, conversation.text_in_cache, conversation.cache) == state, name



SESSION_KEYS = ["messages", "ids", "text_in_cache", "documents", "system", "model_id", "clsa_mlx_session"]


@FUZZ
@given(st.dictionaries(st.sampled_from(SESSION_KEYS), st.none() | st.text(max_size=12) | JSON.map(json.dumps),
                       min_size=1, max_size=4))
def test_fuzzed_session_metadata_loads_or_leaves_the_session_unchanged(conversation, tmp_path, edit):
    from clsa_mlx.conversation import ChatError

    saved = conversation.save(str(tmp_path / "s"))
    state = (list(conversation.messages), conversation.used, conversation.text_in_cache, conversation.cache)
    try:
        conversation.load(_edit(saved, tmp_path / "fuzzed.safetensors", edit))
    except ChatError as e:
        assert "session unchanged" in str(e) and "\n" not in str(e)
        assert (list(conversation.messages), conversation.used, conversation.text_in_cache, conversation.cache) == state
    else:  # it was still a valid session: the conversation goes on from it
        list(conversation.ask("and then?", max_tokens=2))
    conversation.load(saved)

def test_load_refuses_caches_that_do_not_fit_the_model(conversation, tmp_path):
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    from clsa_mlx.conversation import ChatError

    saved = conversation.save(str(tmp_path / "s"))
    n = len(conversation.model.self_decoder.layers)
    for name, edit in {
        "offset past the keys": lambda c: setattr(c[n], "offset", c[n].keys.shape[2] + 5),
        "window size": lambda c: setattr(c[0], "max_size", c[0].max_size * 2),
        "heads": lambda c: setattr(c[n], "keys", mx.concatenate([c[n].keys] * 2, axis=1)),
        "a cache too few": lambda c: c.pop(),
    }.items():
        cache, meta = load_prompt_cache(saved, return_metadata=True)
        edit(cache)
        save_prompt_cache(str(tmp_path / "bad.safetensors"), cache, meta)
        before = (conversation.used, conversation.cache)
        with pytest.raises(ChatError, match="session unchanged"):
            conversation.load(str(tmp_path / "bad.safetensors"))
        assert (conversation.used, conversation.cache) == before, name


def test_chat_refuses_non_utf8_stdin_and_bad_prefill_steps(tmp_path, tiny):
    folder = make_tiny_folder(tmp_path / "m")
    r = subprocess.run([sys.executable, "-m", "clsa_mlx.chat", "--model", str(folder)], input=b"\xff\xfe question",
                       capture_output=True, timeout=120)
    assert r.returncode == 1 and r.stderr.decode().strip() == "error: the piped input is not UTF-8 text"
    model, tokenizer = tiny
    for step in (0, -1):
        with pytest.raises(ValueError, match="prefill_step_size must be a positive integer"):
            next(stream_generate(model, tokenizer, "hello", max_tokens=2, prefill_step_size=step))


# ---- round 2: document caches, session files, tokenizers, templates, adapters, configs ----------

def _doc(path, n_tokens=2100):
    path.write_text("The value of key bada-ko is 12345. " * (n_tokens // 30 + 10))
    return path


def _chat(folder, *args, stdin="", env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "clsa_mlx.chat", "--model", str(folder), *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_the_document_cache_deletes_and_reads_only_its_own_files(tiny, tmp_path):
    from clsa_mlx.conversation import Conversation
    from clsa_mlx.prefix_cache import MARKER, FolderError, PrefixCache

    others = tmp_path / "others"
    others.mkdir()
    (others / "model-00001-of-00002.safetensors").write_bytes(b"a user's shard")
    with pytest.raises(FolderError, match="holds other files"):
        PrefixCache("tiny", others)
    earlier = tmp_path / "earlier"  # the folder as an earlier version left it is still ours
    earlier.mkdir()
    (earlier / f"tiny-{'a' * 32}.safetensors").write_bytes(b"x")
    (earlier / f"tiny-{'b' * 32}.partial-7.safetensors").write_bytes(b"x")
    assert PrefixCache("tiny", earlier).folder == earlier
    (tmp_path / "file").write_text("x")
    with pytest.raises(FolderError, match="is not a folder"):
        PrefixCache("tiny", tmp_path / "file")
    folder = tmp_path / "cache"
    conv = Conversation(*tiny, "tiny", prefill_step=512, prefixes=PrefixCache("tiny", folder, max_gb=1e-6))
    conv.add_document(str(_doc(tmp_path / "d.txt")))
    assert (folder / MARKER).is_file()
    session = conv.save(str(folder / "my-session"))  # a user's file in the folder we made
    conv.reset()
    conv.add_document(str(_doc(tmp_path / "e.txt", 2200)))  # over the size: eviction runs
    assert Path(session).is_file() and (folder / MARKER).is_file()
    assert (others / "model-00001-of-00002.safetensors").read_bytes() == b"a user's shard"


@pytest.mark.e2e
def test_an_empty_document_cache_setting_means_no_folder(tmp_path):
    code = "from clsa_mlx.prefix_cache import FOLDER; print(FOLDER)"
    for value in ("", "  "):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                           env={**os.environ, "CLSA_MLX_DOCUMENT_CACHE": value})
        assert r.stdout.strip() == "None", r.stderr


def test_a_document_cache_entry_is_used_only_for_the_tokens_it_holds(tiny, tmp_path):
    """A file renamed and edited to claim another document, or holding token ids this tokenizer
    did not produce, is prefilled again (and what /save then writes loads back)."""
    from clsa_mlx.conversation import Conversation
    from clsa_mlx.prefix_cache import PrefixCache

    def fresh():
        return Conversation(*tiny, "tiny", prefill_step=512, prefixes=PrefixCache("tiny", tmp_path / "c"))

    a, b = _doc(tmp_path / "a.txt"), tmp_path / "b.txt"
    b.write_text("Another document entirely. " * 90)
    conv = fresh()
    conv.add_document(str(a))
    (entry_a,) = (tmp_path / "c").glob("*.safetensors")
    conv = fresh()
    conv.add_document(str(b))
    entry_b = next(p for p in (tmp_path / "c").glob("*.safetensors") if p != entry_a)
    key_b = mx.load(str(entry_b), return_metadata=True)[1]
    arrays, meta = mx.load(str(entry_a), return_metadata=True)
    meta = {k: key_b[k] if k.endswith(".key") else v for k, v in meta.items()}
    mx.save_safetensors(str(entry_b), arrays, metadata=meta)  # a's cache claiming to be b's
    conv = fresh()
    want = len(conv.tokenizer.encode(conv._rendered_before(f"File b.txt:\n{b.read_text()}"),
                                      add_special_tokens=False))
    conv.add_document(str(b))
    assert not conv.reused and conv.used == want
    ids = json.loads(meta[next(k for k in meta if k.endswith(".ids"))])
    meta = {k: json.dumps([258] * len(ids)) if k.endswith(".ids") else v for k, v in meta.items()}
    mx.save_safetensors(str(entry_a), arrays, metadata=meta)  # a's cache with other token ids
    conv = fresh()
    conv.add_document(str(a))
    assert not conv.reused
    conv.load(conv.save(str(tmp_path / "s")))


def test_the_model_identity_covers_the_tokenizer_and_the_chat_template(tmp_path):
    import shutil

    from clsa_mlx.conversation import model_identity

    folder = make_tiny_folder(tmp_path / "m")
    ids = {model_identity(folder)}
    shutil.copytree(folder, tmp_path / "t")
    tok = json.loads((tmp_path / "t" / "tokenizer.json").read_text())
    tok["model"]["vocab"]["+"], tok["model"]["vocab"]["-"] = tok["model"]["vocab"]["-"], tok["model"]["vocab"]["+"]
    (tmp_path / "t" / "tokenizer.json").write_text(json.dumps(tok))
    ids.add(model_identity(tmp_path / "t"))
    shutil.copytree(folder, tmp_path / "c")
    _with_template(tmp_path / "c", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    ids.add(model_identity(tmp_path / "c"))
    assert len(ids) == 3


def test_a_tokenizer_id_past_the_embedding_is_refused_at_load(tmp_path):
    folder = make_tiny_folder(tmp_path / "m")
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["model"]["vocab"]["+"] = 5000  # 259 pieces still, one of them id 5000
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="ids up to 5000 but the model's vocab_size is 259"):
        clsa_mlx.load(folder)


@pytest.mark.parametrize("content, match", [
    ("{", "tokenizer.json: not a valid tokenizer file"),
    ("[1, 2]", "tokenizer.json: not a valid tokenizer file"),
    ('{"model": {"type": "nothing"}}', "the tokenizer files do not load"),
    (None, "no tokenizer"),
])
def test_broken_or_missing_tokenizer_files_give_one_line(tmp_path, content, match):
    folder = make_tiny_folder(tmp_path / "m")
    if content is None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
    else:
        (folder / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        clsa_mlx.load(folder)
    assert "\n" not in str(e.value)


def _with_template(folder, template):
    (folder / "chat_template.jinja").unlink(missing_ok=True)  # it takes precedence over tokenizer_config.json's
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    return folder


NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
NO_CONTENT = "{% for m in messages %}<|{{ m['role'] }}|><|end|>{% endfor %}"


def test_chat_templates_that_fail_are_found_at_the_start(tmp_path):
    from clsa_mlx.conversation import ChatError, Conversation

    folder = _with_template(make_tiny_folder(tmp_path / "m"), NO_SYSTEM)
    conv = Conversation(*clsa_mlx.load(folder), "x", system="Answer briefly.")
    assert not conv.system_role and conv.notes
    list(conv.ask("hello", max_tokens=2))
    assert conv.messages and "Answer briefly." in conv.text_in_cache
    _with_template(folder, NO_CONTENT)
    with pytest.raises(ChatError, match="drops the messages' text"):
        Conversation(*clsa_mlx.load(folder), "x")


@pytest.mark.e2e
def test_the_chat_command_says_what_it_found_in_the_template(tmp_path):
    folder = _with_template(make_tiny_folder(tmp_path / "m"), NO_SYSTEM)
    r = _chat(folder, "--system", "Answer briefly.", "--prompt", "hi", "--max-tokens", "2")
    assert r.returncode == 0 and "[note] the chat template takes no system message" in r.stderr
    r = _chat(_with_template(folder, NO_CONTENT), "--prompt", "hi")
    assert r.returncode == 1 and r.stderr.strip().startswith("error: ") and "drops the messages' text" in r.stderr


def test_an_exception_from_the_tokenizer_in_the_chat_keeps_the_conversation(conversation, capsys):
    from clsa_mlx.chat import turn

    state = (list(conversation.messages), conversation.used, conversation.text_in_cache)
    encode = conversation.tokenizer.encode

    def broken(text, *a, **k):
        if "boom" in text:
            raise RuntimeError("the tokenizer failed")
        return encode(text, *a, **k)

    conversation.tokenizer.encode = broken
    try:
        assert turn(conversation, "boom", dict(max_tokens=2))
    finally:
        conversation.tokenizer.encode = encode
    assert "[error] RuntimeError: the tokenizer failed; the conversation is unchanged" in capsys.readouterr().out
    assert (list(conversation.messages), conversation.used, conversation.text_in_cache) == state
    assert turn(conversation, "and now?", dict(max_tokens=2)) and len(conversation.messages) == len(state[0]) + 2


def test_bad_numbers_on_the_chat_command_line_are_refused_before_loading(tmp_path):
    from click.testing import CliRunner

    from clsa_mlx.chat import main

    for args in (["--seed", "-1"], ["--seed", str(2**70)], ["--temp", "nan"], ["--top-p", "nan"],
                 ["--document-cache-gb", "inf"], ["--document-cache-gb", "nan"]):
        r = CliRunner().invoke(main, ["--model", str(tmp_path / "no-model"), *args, "--prompt", "hi"])
        assert r.exit_code == 2 and "Invalid value for" in r.output, args


def test_a_document_cache_folder_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from clsa_mlx import chat

    folder = make_tiny_folder(tmp_path / "m")
    (tmp_path / "cachefile").write_text("x")
    monkeypatch.setattr(chat, "FOLDER", tmp_path / "cachefile")
    r = CliRunner().invoke(chat.main, ["--model", str(folder), "--prompt", "hi"])
    assert r.exit_code == 1 and "is not a folder" in r.output and r.exception.__class__ is SystemExit


def test_save_and_load_paths_fifos_devices_folders_and_home(conversation, tmp_path, monkeypatch):
    from clsa_mlx.conversation import ChatError

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ChatError, match="is a FIFO"):
        conversation.save(str(fifo))  # would block forever opening it
    with pytest.raises(ChatError, match="is a FIFO"):
        conversation.load(str(fifo))
    with pytest.raises(ChatError, match="is a FIFO"):
        conversation.add_document(str(fifo))
    with pytest.raises(ChatError, match="is a device"):
        conversation.add_document("/dev/zero")
    (tmp_path / "some" / "folder").mkdir(parents=True)
    for target in ("some/folder/", "some/folder"):
        with pytest.raises(ChatError, match="is a folder"):
            conversation.save(str(tmp_path / target))
    assert not list((tmp_path / "some" / "folder").iterdir())
    os.symlink(tmp_path / "elsewhere.safetensors", tmp_path / "link.safetensors")
    with pytest.raises(ChatError, match="symbolic link"):
        conversation.save(str(tmp_path / "link"))
    assert not (tmp_path / "elsewhere.safetensors").exists()
    monkeypatch.setenv("HOME", str(tmp_path))
    saved = conversation.save("~/s")
    assert saved == str(tmp_path / "s.safetensors") and Path(saved).is_file()
    conversation.load("~/s")


def test_what_a_session_file_holds_is_printed_escaped(conversation, tmp_path, capsys):
    from clsa_mlx.chat import turn

    saved = conversation.save(str(tmp_path / "s"))
    evil = "\x1b]0;owned\x07\x1b[2J"
    messages = [{"role": "user", "content": f"File {evil}.txt:\nhello\n\nQuestion: {evil}"},
                {"role": "assistant", "content": evil}]
    turn(conversation, "/load " + _edit(saved, tmp_path / "m.safetensors", {"model_id": evil}), {})
    turn(conversation, "/load " + _edit(saved, tmp_path / "d.safetensors", {"messages": json.dumps(messages),
                                                                            "documents": json.dumps([])}), {})
    turn(conversation, "/docs", {})
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and out.count("\\x1b]0;owned") >= 3


def test_a_document_that_cannot_fit_is_refused_before_it_is_tokenized(tiny, tmp_path):
    from clsa_mlx.conversation import Conversation

    conv = Conversation(*tiny, "x", max_context=4096)
    calls = _encoded_lengths_of_a_refused(conv, tmp_path, "x" * 3_000_000)
    assert not calls and conv.used == 0 and not conv.documents


def _encoded_lengths_of_a_refused(conv, tmp_path, text):
    """Adds `text` as big.txt, which must be refused as too long: the lengths the tokenizer saw."""
    from clsa_mlx.conversation import ChatError

    big = tmp_path / "big.txt"
    big.write_text(text)
    calls = []
    encode = conv.tokenizer.encode
    conv.tokenizer.encode = lambda text, *a, **k: calls.append(len(text)) or encode(text, *a, **k)
    try:
        with pytest.raises(ChatError, match="big.txt is at least .* tokens .*4096 fit"):
            conv.add_document(str(big))
    finally:
        conv.tokenizer.encode = encode
    return calls


@pytest.mark.e2e
def test_model_file_cli_never_writes_through_links(tmp_path):
    folder = make_tiny_folder(tmp_path / "m")
    outside = tmp_path / "outside.txt"
    for name in ("clsa_mlx_model.py", ".config.json.partial", ".clsa_mlx_model.py.partial"):
        outside.write_text("precious")
        (folder / name).unlink(missing_ok=True)
        os.symlink(outside, folder / name)
        r = subprocess.run([sys.executable, "-m", "clsa_mlx.model_file", str(folder)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert outside.read_text() == "precious" and not (folder / "clsa_mlx_model.py").is_symlink(), name
    (folder / "config.json").write_text("[1]")
    r = subprocess.run([sys.executable, "-m", "clsa_mlx.model_file", str(folder)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == f"error: {folder / 'config.json'}: not a JSON object (a list)"


def test_a_config_far_larger_than_its_weights_is_refused_before_building(tmp_path):
    import resource
    import time

    folder = make_tiny_folder(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    for change, match in (({"n_layers": 200_000}, "n_layers 200000 means 100000 self_decoder layers, the weights "
                                                   "hold 2"),
                          ({"dim": 2**23, "n_self_heads": 1, "n_self_kv_heads": 1, "n_attn_heads": 1, "n_attn_kv_heads": 1},
                           "dim 8388608, but layer_norm.weight has shape"),
                          ({"hidden_dim": 10**7}, "hidden_dim 10000000, but"),
                          ({"index_head_dim": 2**23}, "index_head_dim 8388608, but cross_decoder.indexer.q_proj")):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        t, rss = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(ValueError, match=match) as e:
            clsa_mlx.load(folder)
        assert str(e.value).startswith(f"{folder / 'config.json'}: config.json does not fit the weights")
        assert time.perf_counter() - t < 2 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200_000


def _adapter(tmp_path, config=None, weights=None):
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    base = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}}
    (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps({**base,
                                                                                                  **(config or {})}))
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights or {"x.lora_a": mx.zeros((2, 2))})
    return folder


@pytest.mark.parametrize("config, weights, match", [
    ({"lora_parameters": {"rank": 2**40, "scale": 1.0}}, None, "lora_parameters.rank must be an integer from 1"),
    ({"lora_parameters": {"rank": 4, "scale": float("nan")}}, None, "lora_parameters.scale must be a number"),
    ({"num_layers": "all"}, None, "num_layers must be an integer"),
    ({"fine_tune_type": "magic"}, None, "fine_tune_type 'magic'"),
    ("{", None, "adapter_config.json: not valid JSON"),
    ("[]", None, "adapter_config.json: not a JSON object"),
    (None, {"self_decoder.layers.1.mixer.q_proj.lora_a": mx.zeros((64, 4), mx.int32)}, "is I32; adapter weights"),
])
def test_adapters_are_checked_before_mlx_lm_builds_them(tmp_path, config, weights, match):
    folder = make_tiny_folder(tmp_path / "m")
    with pytest.raises(ValueError, match=match) as e:
        clsa_mlx.load(folder, adapter_path=_adapter(tmp_path, config, weights))
    assert str(tmp_path / "adapter") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content, match", [("{", "config.json: not valid JSON"),
                                            ("[]", "config.json: not a JSON object")])
def test_a_broken_config_names_the_file(tmp_path, content, match):
    folder = make_tiny_folder(tmp_path / "m")
    (folder / "config.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        clsa_mlx.load(folder)


def test_a_refused_pickle_names_its_file(tmp_path):
    model, args = make_model("retention-dense")
    src = write_official(model, args, tmp_path / "src")
    torch_file(src / "checkpoint.pth", pkl(call(G("numpy", "dtype"), S("V4"), b"\x89", b"\x88")))
    with pytest.raises(ConvertError, match=r"checkpoint.pth: refused \(numpy dtype 'V4'\); only tensors") as e:
        convert(str(src), str(tmp_path / "out"))
    assert str(src / "checkpoint.pth") in str(e.value) and not (tmp_path / "out").exists()


def test_the_document_cache_never_writes_through_links(tiny, tmp_path):
    from clsa_mlx.conversation import Conversation
    from clsa_mlx.prefix_cache import MARKER, PrefixCache

    folder, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    folder.mkdir()
    os.symlink(outside / "marker", folder / MARKER)  # dangling: writing the marker would create it outside
    prefixes = PrefixCache("tiny", folder)
    doc = _doc(tmp_path / "d.txt")
    text = Conversation(*tiny, "tiny")._rendered_before(f"File d.txt:\n{doc.read_text()}")
    os.symlink(outside / "entry", prefixes._path(prefixes._key(text)))
    conv = Conversation(*tiny, "tiny", prefill_step=512, prefixes=prefixes)
    conv.add_document(str(doc))
    assert not list(outside.iterdir()) and not prefixes._path(prefixes._key(text)).is_symlink()
    again = Conversation(*tiny, "tiny", prefixes=PrefixCache("tiny", folder))
    again.add_document(str(doc))
    assert again.reused


def test_adapter_weights_of_the_wrong_shape_or_names_give_one_line(tmp_path):
    folder = make_tiny_folder(tmp_path / "m")
    for weights, match in (({"cross_decoder.layers.0.mixer.q_proj.lora_a": mx.zeros((64, 5))}, "does not match"),
                           ({"nothing.lora_a": mx.zeros((2, 2))}, "not an adapter parameter")):
        with pytest.raises(ValueError, match=match) as e:
            clsa_mlx.load(folder, adapter_path=_adapter(tmp_path, {"num_layers": 2}, weights))
        assert str(e.value).startswith(str(tmp_path / "adapter")) and "\n" not in str(e.value)
    model, _ = clsa_mlx.load(folder, adapter_path=_adapter(tmp_path, None, {
        "cross_decoder.layers.0.mixer.q_proj.lora_a": mx.zeros((64, 4))}))  # a well-formed adapter loads


ADAPTER_VALUES = st.none() | st.booleans() | st.integers(-10, 10**12) | st.floats() | st.text(max_size=4) \
    | st.lists(st.integers(0, 3), max_size=2)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["fine_tune_type", "num_layers", "rank", "scale", "dropout", "keys"]),
                       ADAPTER_VALUES, min_size=1, max_size=3))
def test_fuzzed_adapter_configs_load_or_give_one_line(tmp_path_factory, changes):
    tmp = tmp_path_factory.mktemp("a")
    folder = make_tiny_folder(tmp / "m")
    lora = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora}
    for k, v in changes.items():
        (lora if k in lora or k == "keys" else config)[k] = v
    try:
        clsa_mlx.load(folder, adapter_path=_adapter(tmp, config, {
            "cross_decoder.layers.0.mixer.q_proj.lora_a": mx.zeros((64, 4))}))
        event("loaded")
    except ValueError as e:
        assert "\n" not in str(e) and str(tmp / "adapter") in str(e)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["n_layers", "dim", "hidden_dim", "vocab_size", "n_self_heads",
                                        "n_attn_heads", "n_attn_kv_heads", "index_head_dim", "sliding_window"]),
                       st.integers(-2, 2**40) | st.sampled_from([2, 4, 6, 16, 64, 128, 20_000]), min_size=1,
                       max_size=3))
def test_fuzzed_config_sizes_load_or_give_one_line_before_building(tmp_path_factory, changes):
    import time

    folder = make_tiny_folder(tmp_path_factory.mktemp("c") / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    t = time.perf_counter()
    try:
        clsa_mlx.load(folder)
    except ValueError as e:
        assert "\n" not in str(e) and str(folder) in str(e)
    assert time.perf_counter() - t < 5


def test_a_reply_is_printed_with_its_control_characters_escaped(conversation):
    import io

    from clsa_mlx.chat import reply

    conversation.ask = lambda *a, **k: iter(["\x1b]0;owned\x07", "line\n\ttab \u202eevil"])
    out = io.StringIO()
    reply(conversation, "hi", out=out)
    assert out.getvalue() == "\\x1b]0;owned\\x07line\n\ttab \\u202eevil\n"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["a", "b", "+", " ", "\u0120"]), st.integers(0, 10**6), min_size=1, max_size=3))
def test_fuzzed_tokenizer_ids_load_only_within_the_embedding(tmp_path_factory, ids):
    folder = make_tiny_folder(tmp_path_factory.mktemp("t") / "m")
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["model"]["vocab"].update({k: v for k, v in ids.items() if k in tok["model"]["vocab"]})
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    top = max(tok["model"]["vocab"].values())
    try:
        model, tokenizer = clsa_mlx.load(folder)
    except ValueError as e:
        assert top >= 259 and "\n" not in str(e) and f"ids up to {top}" in str(e)
        return
    assert top < 259 and max(tokenizer.encode("ab+ c\u0120", add_special_tokens=False)) < 259


# Open: the fixes belong to clsa_mlx/generate.py and clsa_mlx/model.py (strict: a fix turns these into failures
# until the mark goes).
def test_numpy_integer_prompts_in_range_are_token_ids(tiny):
    model, tokenizer = tiny
    assert clsa_mlx.generate(model, tokenizer, [np.int64(5), np.int32(7)], max_tokens=2) == \
        clsa_mlx.generate(model, tokenizer, [5, 7], max_tokens=2)


def test_a_fractional_max_tokens_is_named(tiny):
    with pytest.raises(ValueError, match="max_tokens"):
        clsa_mlx.generate(*tiny, "hi", max_tokens=4.5)


@pytest.mark.xfail(strict=True, reason="model.py clamps an out-of-vocabulary id last in a list handed to mlx-lm")
def test_an_id_outside_the_vocabulary_last_in_an_mlx_lm_prompt_is_refused(tiny):
    import mlx_lm

    with pytest.raises(ValueError, match="not a token id"):
        mlx_lm.generate(*tiny, [5, 6, 259], max_tokens=2)


def test_a_long_document_is_refused_after_tokenizing_a_head_only(tiny, tmp_path):
    """Where the size bound cannot tell (a tokenizer with long pieces), a head of 8 characters per
    token of room is tokenized, not the whole document."""
    from clsa_mlx.conversation import Conversation

    conv = Conversation(*tiny, "x", max_context=4096)
    conv._longest = 10**6  # a tokenizer whose longest piece says nothing
    calls = _encoded_lengths_of_a_refused(conv, tmp_path, "word " * 600_000)
    assert calls == [8 * 4096] and conv.used == 0 and not conv.documents
    small = tmp_path / "small.txt"
    small.write_text("word " * 600)
    assert conv.add_document(str(small)) > 0  # one that fits is added as before
