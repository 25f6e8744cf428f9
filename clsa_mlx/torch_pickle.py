"""Read `torch.save` files without torch and without running pickled code.

A `.pth` / `.bin` file written by `torch.save` (PyTorch >= 1.6) is a zip archive:
`<name>/data.pkl` (a pickle of the object tree), `<name>/data/<key>` (one raw
buffer per storage), `<name>/byteorder`, `<name>/version`. The pickle rebuilds each
tensor by calling `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
on a storage it names through a "persistent id".

A plain `pickle.load` would import and call whatever globals the file names
(`os.system` through `__reduce__` is the classic exploit). Here `find_class` is an
allowlist: it hands out *our own* small functions for the tensor-rebuild globals and
a few plain containers, and refuses every other global with an error that names it,
before anything is called. BUILD may only fill the dicts of containers this load made (and set
a numpy dtype's byte order); the stand-ins it hands out are frozen; compressed or encrypted
entries are refused (torch.save stores), so no allocation outgrows the file. Storages become numpy views of a read-only memory map of
the archive (zero copy; CRC-checked when first used), so converting needs no torch install.

bfloat16 (and float8) have no numpy dtype: their raw bits are kept (uint16 / uint8)
and `TensorData.to_mlx()` reinterprets them, so no value goes through float32.

The legacy pre-1.6 (non-zip) torch format is refused with a clear message.
"""

from __future__ import annotations

import collections
import io
import math
import mmap
import os
import pickle
import struct
import types
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

__all__ = [
    "TensorData",
    "TorchFormatError",
    "UnsafePickleError",
    "load",
]


class TorchFormatError(ValueError):
    """The file is not a readable torch zip checkpoint (truncated, corrupted, legacy...)."""

    def __str__(self):  # one line, even where the message quotes names read from the file
        return " ".join(super().__str__().split())


class UnsafePickleError(TorchFormatError):
    """The pickle asks for a global outside the allowlist (it could run code)."""


# torch dtype name -> (numpy dtype used to hold the values or their raw bits, itemsize)
_DTYPES = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "bfloat16": np.uint16,  # raw bits
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
    "complex64": np.complex64,
    "complex128": np.complex128,
    "float8_e4m3fn": np.uint8,  # raw bits
    "float8_e5m2": np.uint8,
    "float8_e4m3fnuz": np.uint8,
    "float8_e5m2fnuz": np.uint8,
    "float8_e8m0fnu": np.uint8,
}

# legacy typed-storage class names (`torch.FloatStorage` ...) -> dtype name
_STORAGES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}


@dataclass(frozen=True)
class TensorData:
    """A tensor read from a torch file.

    `array` holds the values (a numpy view into the memory-mapped file), except for
    dtypes numpy lacks (bfloat16, float8), where it holds their raw bits.
    """

    array: np.ndarray
    dtype: str  # torch dtype name, e.g. "bfloat16"
    storage: Optional["_Storage"] = None

    @property
    def shape(self):
        return tuple(self.array.shape)

    def verify(self):
        """Check the CRC-32 of the bytes behind this tensor (done once per storage, on first use)."""
        if self.storage is not None:
            self.storage.verify()
        return self

    def to_mlx(self):
        import mlx.core as mx

        self.verify()
        a = np.ascontiguousarray(self.array)
        if self.dtype == "bfloat16":
            return mx.array(a).view(mx.bfloat16)
        if self.dtype not in ("float32", "float16", "float64", "bool") and not self.dtype.startswith(("int", "uint")):
            raise TorchFormatError(f"dtype {self.dtype} cannot be converted to MLX")
        if self.dtype == "float64":
            a = a.astype(np.float32)
        return mx.array(a)

    def __repr__(self):
        return f"TensorData(shape={self.shape}, dtype={self.dtype})"


# ---- markers handed out by find_class instead of the real torch objects ----------


# Frozen, and the unpickler's BUILD refuses them: one file cannot change what the next one reads.
@dataclass(frozen=True)
class _StorageType:
    dtype: Optional[str]  # None for UntypedStorage (the tensor's dtype comes from v3)


@dataclass(frozen=True)
class _DType:
    name: str


@dataclass(frozen=True)
class _TensorClass:
    """Stands for `torch.Tensor` / `torch.nn.parameter.Parameter` in `_rebuild_from_type_v2`."""

    name: str


@dataclass
class _Storage:
    raw: np.ndarray  # uint8 bytes
    dtype: Optional[str]
    key: str
    crc: Optional[int] = None  # expected CRC-32; None once checked (or when zipfile checked it)
    where: str = ""

    def verify(self):
        # Lazy, so that a training checkpoint's optimizer state is never read, only mapped.
        if self.crc is not None:
            if zlib.crc32(self.raw) != self.crc:
                raise TorchFormatError(f"{self.where}: checksum mismatch in storage {self.key} (corrupted file)")
            self.crc = None


def _rebuild(storage, offset, size, stride, dtype):
    if not isinstance(storage, _Storage):
        raise TorchFormatError("malformed tensor record: its storage is not a storage reference")
    if dtype is None:
        raise TorchFormatError(f"storage {storage.key}: no dtype")
    if dtype not in _DTYPES:
        raise TorchFormatError(f"storage {storage.key}: unknown dtype {dtype}")
    np_dtype = np.dtype(_DTYPES[dtype])
    try:
        offset = int(offset)
        size = tuple(int(s) for s in size)
        stride = tuple(int(s) for s in stride)
    except (TypeError, ValueError):
        raise TorchFormatError(f"storage {storage.key}: malformed tensor shape/stride") from None
    if len(size) != len(stride) or offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise TorchFormatError(f"storage {storage.key}: malformed tensor shape/stride {size}/{stride}")
    n = storage.raw.size // np_dtype.itemsize
    values = storage.raw[: n * np_dtype.itemsize].view(np_dtype)
    if 0 in size:
        return TensorData(np.zeros(size, np_dtype), dtype, storage)
    last = offset + sum((s - 1) * st for s, st in zip(size, stride))
    if last >= n:
        raise TorchFormatError(
            f"storage {storage.key}: tensor of shape {size} at offset {offset} reaches element {last}, "
            f"but the storage holds {n} (truncated or corrupted file)"
        )
    if math.prod(size) > n:  # only overlapping (e.g. stride-0) views can: memory beyond what the file holds
        raise TorchFormatError(
            f"storage {storage.key}: tensor of shape {size}, strides {stride} repeats elements of a storage "
            f"of {n}; refusing to expand it"
        )
    arr = np.lib.stride_tricks.as_strided(
        values[offset:],
        shape=size,
        strides=tuple(st * np_dtype.itemsize for st in stride),
        writeable=False,
    )
    return TensorData(arr, dtype, storage)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _rebuild(storage, storage_offset, size, stride, getattr(storage, "dtype", None))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, _DType):
        raise TorchFormatError("malformed tensor record: dtype is not a torch dtype")
    return _rebuild(storage, storage_offset, size, stride, dtype.name)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, TensorData):
        raise TorchFormatError("malformed parameter record")
    return data


_REBUILDERS = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _REBUILDERS or not isinstance(new_type, _TensorClass) or not isinstance(args, tuple):
        raise UnsafePickleError("torch._tensor._rebuild_from_type_v2 with something other than a plain tensor")
    return func(*args)


def _codecs_encode(text, encoding="utf-8"):
    # protocol-2 pickles write bytes as _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode is only allowed for latin1 text")
    return text.encode("latin1")


def _device(kind="cpu", index=None):
    return str(kind) if index is None else f"{kind}:{int(index)}"


class _Namespace(types.SimpleNamespace):
    """Inert stand-in for argparse.Namespace (old fairseq checkpoints keep their args in one)."""


def _plain(dtype) -> bool:
    return isinstance(dtype, np.dtype) and dtype.kind in "biufc" and dtype.names is None and dtype.subdtype is None


def _np_scalar(dtype, data=None):
    if not _plain(dtype) or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafePickleError("numpy scalar of a non-plain dtype or of the wrong size")
    return np.frombuffer(data, dtype)[0].item()


def _np_dtype(name, align=False, copy=True):
    if not isinstance(name, str) or len(name) > 4 or not name[:1].isalpha():
        raise UnsafePickleError(f"numpy dtype {name!r}")
    try:
        d = np.dtype(name)
    except TypeError:
        raise UnsafePickleError(f"numpy dtype {name!r}") from None
    if not _plain(d):
        raise UnsafePickleError(f"numpy dtype {name!r}")
    return d


def _dtype_with_state(d: np.dtype, state):
    """numpy pickles a dtype as np.dtype(name) + BUILD (version, byte order, None, None, None,
    -1, -1, flags). Only the byte order is taken, into a new dtype: fields, sizes and offsets
    from a file could make a dtype that reads outside its buffer."""
    if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in ("<", ">", "|", "=")
            and state[2] is None and state[3] is None and state[4] is None):
        raise UnsafePickleError("numpy dtype state with fields, a subarray or a size of its own")
    return d.newbyteorder(state[1]) if state[1] != "|" else d


def _bytearray(data=b"", encoding=None):
    # protocol 2-4 pickle a bytearray as bytearray(str, "latin-1") or bytearray(bytes); never a size
    if isinstance(data, str) and encoding in ("latin1", "latin-1"):
        return bytearray(data, encoding)
    if isinstance(data, bytes) and encoding is None:
        return bytearray(data)
    raise UnsafePickleError("bytearray of something other than bytes (a size would allocate it)")


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): _codecs_encode,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorClass("Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorClass("Parameter"),
    ("torch", "Size"): tuple,
    ("torch", "device"): _device,
    ("torch.storage", "UntypedStorage"): _StorageType(None),
    ("argparse", "Namespace"): _Namespace,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy", "dtype"): _np_dtype,
}
for _name, _dt in _STORAGES.items():
    _ALLOWED[("torch", _name)] = _StorageType(_dt)
for _dt in _DTYPES:
    _ALLOWED[("torch", _dt)] = _DType(_dt)


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, so that BUILD (`__setstate__`, attribute updates) can be
    checked: it may fill only dicts of the objects this load created (an OrderedDict's
    `_metadata`, a Namespace's fields) and set a numpy dtype's byte order, nothing else."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, storage_loader, where):
        super().__init__(file, encoding="utf-8")
        self._load_storage = storage_loader
        self._where = where

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.dtype):
            self.stack[-1] = _dtype_with_state(inst, state)
            return
        if type(inst) not in (collections.OrderedDict, _Namespace) or not isinstance(state, dict) \
                or not all(isinstance(k, str) for k in state):
            raise UnsafePickleError(f"{self._where}: refusing to load: the pickle sets the state of a "
                                    f"{type(inst).__name__}, which only plain containers may have")
        inst.__dict__.update(state)

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"{self._where}: refusing to load: the pickle asks for the global {_cut(module, 60)}.{_cut(name, 60)}, "
                "which is not a tensor or plain container (it could run code)"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchFormatError(f"{self._where}: unsupported persistent id {str(pid)[:80]}")
        _, storage_type, key, _location, _numel = pid
        if not isinstance(storage_type, _StorageType):
            raise TorchFormatError(f"{self._where}: persistent id without a storage type")
        return self._load_storage(str(key), storage_type.dtype)


_LOCAL_HEADER = struct.Struct("<4s5H3I2H")


def _cut(text, n: int = 120) -> str:
    """A name from the file, cut so an error stays one readable line."""
    text = repr(str(text))[1:-1]
    return text if len(text) <= n else text[:n] + f"... ({len(text)} characters)"


class _Archive:
    def __init__(self, path):
        self.path = str(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            magic = f.read(4)
            if magic != b"PK\x03\x04":
                if magic[:1] == b"\x80":
                    raise TorchFormatError(
                        f"{self.path}: legacy (pre-1.6, non-zip) torch format is not supported; "
                        "re-save it with a current torch.save"
                    )
                raise TorchFormatError(f"{self.path}: not a PyTorch checkpoint (no zip header)")
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.zip = zipfile.ZipFile(self.path)
            self.infos = {i.filename: i for i in self.zip.infolist()}
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise TorchFormatError(f"{self.path}: truncated or corrupted archive ({e})") from None
        self.size = size
        pkls = [n for n in self.infos if n.endswith("data.pkl") and n.count("/") <= 1]
        if len(pkls) != 1:
            raise TorchFormatError(f"{self.path}: not a torch.save archive (found {len(pkls)} data.pkl entries)")
        self.prefix = pkls[0][: -len("data.pkl")]
        self.storages = {}
        order = self._read_small("byteorder", b"little").strip()
        if order not in (b"little", b"big"):
            raise TorchFormatError(f"{self.path}: bad byteorder record {order!r}")
        self.big_endian = order == b"big"

    def _stored(self, info):
        # torch.save never compresses: a compressed entry is a crafted file (a small one can inflate to GBs)
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise TorchFormatError(f"{self.path}: entry {_cut(info.filename)} is compressed or encrypted; "
                                   "torch.save writes every entry stored")
        return info

    def _read_small(self, name, default=None):
        info = self.infos.get(self.prefix + name)
        if info is None:
            if default is None:
                raise TorchFormatError(f"{self.path}: missing archive entry {self.prefix + name}")
            return default
        self._stored(info)
        try:
            return self.zip.read(info)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
            raise TorchFormatError(f"{self.path}: corrupted entry {info.filename} ({e})") from None

    def storage(self, key, dtype):
        if key in self.storages:
            return self.storages[key]
        name = f"{self.prefix}data/{key}"
        info = self.infos.get(name)
        if info is None:
            raise TorchFormatError(f"{self.path}: missing storage {name} (truncated or corrupted file)")
        self._stored(info)
        if info.header_offset + _LOCAL_HEADER.size > self.size:
            raise TorchFormatError(f"{self.path}: storage {name} lies past the end of the file (truncated)")
        header = _LOCAL_HEADER.unpack_from(self.map, info.header_offset)
        if header[0] != b"PK\x03\x04":
            raise TorchFormatError(f"{self.path}: corrupted local header of {name}")
        start = info.header_offset + _LOCAL_HEADER.size + header[-2] + header[-1]
        if start + info.file_size > self.size:
            raise TorchFormatError(f"{self.path}: storage {name} lies past the end of the file (truncated)")
        raw = np.frombuffer(self.map, np.uint8, info.file_size, start)
        crc = info.CRC
        if self.big_endian and dtype in _DTYPES and np.dtype(_DTYPES[dtype]).itemsize > 1:
            if crc is not None and zlib.crc32(raw) != crc:
                raise TorchFormatError(f"{self.path}: checksum mismatch in {name} (corrupted file)")
            raw = raw.view(np.dtype(_DTYPES[dtype]).newbyteorder(">")).astype(_DTYPES[dtype]).view(np.uint8)
            crc = None
        st = _Storage(raw, dtype, key, crc, self.path)
        self.storages[key] = st
        return st


def load(path) -> Any:
    """Load a `torch.save` zip file. Tensors come back as `TensorData`, containers as dicts/lists.

    Raises `UnsafePickleError` for any global outside the allowlist (nothing is called before
    the check) and `TorchFormatError` for unreadable files. Tensor bytes are memory-mapped, not
    read: their CRC is checked by `TensorData.verify()` / `to_mlx()`.
    """
    try:
        archive = _Archive(path)
    except FileNotFoundError:
        raise TorchFormatError(f"{path}: no such file") from None
    data = archive._read_small("data.pkl")
    unpickler = _RestrictedUnpickler(io.BytesIO(data), archive.storage, str(path))
    try:
        return unpickler.load()
    except TorchFormatError:
        raise
    except Exception as e:  # only our allowlisted functions ran: whatever broke, the file is malformed
        raise TorchFormatError(f"{path}: corrupted pickle data.pkl ({type(e).__name__}: {_cut(e)})") from None
