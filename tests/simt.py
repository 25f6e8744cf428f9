"""The kernel text of `metal/` run on the CPU by a SIMT emulator (tests/shims/simt.h), so the
suite checks every kernel against its reference where no GPU is: one C++ unit per
instantiation (the shared common.h and kernel body, with the emulator's dialect and
prologue), built once with the system compiler and called through ctypes. A `Kernel(name)`
takes and returns what `mx.fast.metal_kernel(...)` objects do, and counts the bytes each
buffer is read or written; `emulated()` patches `clsa_mlx.kernels` so the dispatch, its
self-test included, runs on the emulator.

What it proves: the algorithm, the index arithmetic (every device-buffer index is checked),
the barriers (fibers between two barriers run in a random order, groups too) and that every
thread reaches each barrier. What it cannot: GPU memory ordering, compiler quirks, speed."""

import contextlib
import ctypes
import hashlib
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from unittest import mock

import mlx.core as mx
import numpy as np

from clsa_mlx import kernels

SHIMS = Path(__file__).parent / "shims"
BUILD = Path(tempfile.gettempdir()) / f"clsa-mlx-simt-{os.getuid()}"
TYPES = {"float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t", "int32": "int32_t", "uint32": "uint32_t"}
NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int32": np.int32, "uint32": np.uint32}
POISON = 0xA5  # bytes of outputs MLX leaves uninitialised: a slot a kernel never writes shows
SOURCES = kernels.SOURCE_DIR


def compiler():
    return next((shutil.which(n) for n in ("c++", "g++", "clang++") if shutil.which(n)), None)


def _dt(dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def _body(name) -> str:
    return (SHIMS / "prologue_simt.inc").read_text() + "\n" + (SOURCES / kernels.KERNELS[name][0]).read_text()


def unit(name, in_dtypes, out_dtypes, template) -> str:
    _, in_names, out_names = kernels.KERNELS[name]
    body = _body(name)
    args, unpack, n = [], [], 0
    for nm, dt, const in [(nm, dt, "const ") for nm, dt in zip(in_names, in_dtypes)] + [
        (nm, dt, "") for nm, dt in zip(out_names, out_dtypes)
    ]:
        ty = f"{const}{TYPES[dt]}"
        args.append(f"simt::Ptr<{ty}> {nm}")
        unpack.append(f'simt::Ptr<{ty}>{{({ty}*)b[{n}], ({ty}*)b[{n}], sizes[{n}], "{nm}", &counts[{n}]}}')
        n += 1
        if const and f"{nm}_strides" in body:
            args.append(f"const int64_t* {nm}_strides")
            unpack.append(f"(const int64_t*)b[{n}]")
            n += 1
    consts = "".join(
        f"  using {k} = {TYPES[v]};\n" if isinstance(v, str) else f"  constexpr int {k} = {int(v)};\n"
        for k, v in template
    )
    return (
        f'#include "simt.h"\n{(SHIMS / "dialect_simt.h").read_text()}\n{(SOURCES / "common.h").read_text()}\n'
        f"static void kernel({', '.join(args)}) {{\n{consts}{body}\n}}\n"
        'extern "C" int launch(void** b, const int64_t* sizes, int64_t* counts, const unsigned* groups, int tg, unsigned seed, char* err, int n) {\n'
        f"  std::string e = simt::launch(groups, tg, seed, [&] {{ kernel({', '.join(unpack)}); }});\n"
        "  std::snprintf(err, n, \"%s\", e.c_str());\n  return e.empty() ? 0 : 1;\n}\n"
    )


def build(src: str) -> ctypes.CDLL:
    BUILD.mkdir(exist_ok=True)
    digest = hashlib.sha256((src + (SHIMS / "simt.h").read_text()).encode()).hexdigest()
    lib = BUILD / f"{digest[:20]}.so"
    if not lib.exists():
        cpp, tmp = lib.with_suffix(f".{os.getpid()}.cpp"), lib.with_suffix(f".{os.getpid()}.tmp")
        cpp.write_text(src)
        cmd = [compiler(), "-std=c++14", "-O1", "-shared", "-fPIC", f"-I{SHIMS}", "-o", str(tmp), str(cpp)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"simt: {cpp} does not compile:\n{res.stderr[-4000:]}")
        tmp.replace(lib)
    dll = ctypes.CDLL(str(lib))
    dll.launch.restype = ctypes.c_int
    return dll


_seeds = itertools.count(1)


def _host(a: mx.array):
    """A numpy view of an evaluated MLX array (its strides kept), its element strides and
    how many elements from its first one it spans."""
    mx.eval(a)
    v = np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a, copy=False)
    strides = [s // v.itemsize for s in v.strides] or [1]
    span = 1 + sum((d - 1) * s for d, s in zip(v.shape, strides)) if v.size else 0
    return v, np.array(strides, dtype=np.int64), span


class Kernel:
    def __init__(self, name: str):
        self.name = name
        self.libs = {}
        self.launches = 0
        self.bytes = {}  # buffer name -> bytes read or written, over all launches
        body = _body(name)
        self.strided = [f"{nm}_strides" in body for nm in kernels.KERNELS[name][1]]

    def __call__(self, inputs, output_shapes, output_dtypes, grid, threadgroup, template=(), init_value=None, **_):
        template = tuple((k, _dt(v) if isinstance(v, mx.Dtype) else v) for k, v in template)
        outs = [_dt(d) for d in output_dtypes]
        key = (tuple(_dt(a.dtype) for a in inputs), tuple(outs), template)
        if key not in self.libs:
            self.libs[key] = build(unit(self.name, key[0], outs, template))
        if threadgroup[1:] != (1, 1) or grid[0] % threadgroup[0]:
            raise ValueError(f"simt: grid {grid} is not whole groups of {threadgroup}")
        keep, ptrs, sizes, names = [], [], [], []
        in_names, out_names = kernels.KERNELS[self.name][1:]
        for nm, strided, a in zip(in_names, self.strided, inputs):
            v, strides, span = _host(a)
            keep += [v, strides, a]
            ptrs.append(v.ctypes.data)
            sizes.append(span)
            names.append((nm, v.itemsize))
            if strided:
                ptrs.append(strides.ctypes.data)
                sizes.append(0)
                names.append((None, 0))
        results = []
        for nm, shape, dt in zip(out_names, output_shapes, outs):
            o = np.empty(shape, NUMPY[dt])
            if init_value is None:
                o.view(np.uint8)[...] = POISON
            else:
                o[...] = init_value
            results.append(o)
            ptrs.append(o.ctypes.data)
            sizes.append(o.size)
            names.append((nm, o.itemsize))
        groups = (ctypes.c_uint * 3)(grid[0] // threadgroup[0], grid[1], grid[2])
        err = ctypes.create_string_buffer(300)
        argv = (ctypes.c_void_p * len(ptrs))(*ptrs)
        spans = (ctypes.c_int64 * len(sizes))(*sizes)
        counts = (ctypes.c_int64 * len(sizes))()
        if self.libs[key].launch(argv, spans, counts, groups, threadgroup[0], next(_seeds), err, len(err)):
            raise RuntimeError(f"simt {self.name}: {err.value.decode()}")
        self.launches += 1
        for (nm, size), n in zip(names, counts):
            if nm:
                self.bytes[nm] = self.bytes.get(nm, 0) + n * size
        return [
            mx.array(o).view(mx.bfloat16) if dt == "bfloat16" else mx.array(o) for o, dt in zip(results, outs)
        ]


@contextlib.contextmanager
def emulated():
    """The dispatch of clsa_mlx.sparse with the emulated kernels as its backend ("simt")."""
    made = {}

    def factory(be, name):
        return made.setdefault(name, Kernel(name))

    with mock.patch.object(kernels, "_kernel", factory), mock.patch.object(kernels, "backend", lambda: "simt"):
        yield made
