"""The translation units MLX would build for each kernel instantiation the dispatch
produces: for Metal (`metal_kernel`), for CUDA (`cuda_kernel`), and for clang's C++ for
OpenCL (the Metal text with address spaces that clang enforces). Used by
tests/test_kernels_build.py."""

import re
from pathlib import Path
from unittest import mock

import mlx.core as mx

from clsa_mlx import kernels

SHIMS = Path(__file__).parent / "shims"

METAL_TYPES = {
    "float32": "float",
    "float16": "float16_t",
    "bfloat16": "bfloat16_t",
    "int32": "int32_t",
    "uint32": "uint32_t",
}
CUDA_TYPES = {
    "float32": "float",
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
    "int32": "int32_t",
    "uint32": "uint32_t",
}
METAL_ATTRIBUTES = {
    "dispatch_quadgroups_per_threadgroup": "uint",
    "dispatch_simdgroups_per_threadgroup": "uint",
    "dispatch_threads_per_threadgroup": "uint3",
    "grid_origin": "uint3",
    "grid_size": "uint3",
    "quadgroup_index_in_threadgroup": "uint",
    "quadgroups_per_threadgroup": "uint",
    "simdgroup_index_in_threadgroup": "uint",
    "simdgroups_per_threadgroup": "uint",
    "thread_execution_width": "uint",
    "thread_index_in_quadgroup": "uint",
    "thread_index_in_simdgroup": "uint",
    "thread_index_in_threadgroup": "uint",
    "thread_position_in_grid": "uint3",
    "thread_position_in_threadgroup": "uint3",
    "threadgroup_position_in_grid": "uint3",
    "threadgroups_per_grid": "uint3",
    "threads_per_grid": "uint3",
    "threads_per_simdgroup": "uint",
    "threads_per_threadgroup": "uint3",
}


def _shape_info(body, name):
    return [s in body for s in (f"{name}_shape", f"{name}_strides", f"{name}_ndim")]


def _targ_str(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def metal_unit(kernel, inputs, outputs, template, fname=None, with_header=True):
    """The source MLX's metal_kernel builds (mlx/backend/metal/custom_kernel.cpp)."""
    header, body = kernels.kernel_text("metal", kernel)
    _, in_names, out_names = kernels.KERNELS[kernel]
    fname = fname or f"custom_kernel_clsa_{kernel}"
    src = header if with_header else ""
    if template:
        kinds = [
            "bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "typename"
            for _, v in template
        ]
        src += "template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, template)) + ">\n"
    args, index = [], 0
    for name, (dt, size) in zip(in_names, inputs):
        loc = "constant" if size < 8 else "device"
        args.append(f"  const {loc} {METAL_TYPES[dt]}* {name} [[buffer({index})]]")
        index += 1
        shp, strd, nd = _shape_info(body, name)
        for flag, decl in (
            (shp, f"const constant int* {name}_shape"),
            (strd, f"const constant int64_t* {name}_strides"),
            (nd, f"const constant int& {name}_ndim"),
        ):
            if flag:
                args.append(f"  {decl} [[buffer({index})]]")
                index += 1
    for name, dt in zip(out_names, outputs):
        args.append(f"  device {METAL_TYPES[dt]}* {name} [[buffer({index})]]")
        index += 1
    for attr, ty in METAL_ATTRIBUTES.items():
        if attr in body:
            args.append(f"  {ty} {attr} [[{attr}]]")
    src += f"[[kernel]] void {fname}(\n" + ",\n".join(args) + ") {\n" + body + "\n}\n"
    if template:
        targs = ", ".join(
            METAL_TYPES[v] if isinstance(v, str) else _targ_str(v) for _, v in template
        )
        inst = f"{fname}<{targs}>"
        # MLX writes `template [[host_name("...")]] [[kernel]] decltype(f<...>) f<...>;`;
        # plain C++ does not take attributes there, so the check drops them.
        src += f"\ntemplate decltype({inst}) {inst};\n"
    return src


def cuda_unit(kernel, inputs, outputs, template, fname=None, with_header=True):
    """The source MLX's cuda_kernel builds (mlx/backend/cuda/custom_kernel.cpp)."""
    header, body = kernels.kernel_text("cuda", kernel)
    _, in_names, out_names = kernels.KERNELS[kernel]
    fname = fname or f"custom_kernel_clsa_{kernel}"
    src = ""
    if with_header:
        src += (
            '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
            "#define inf cuda::std::numeric_limits<float>::infinity()\n\n"
        )
        src += header
    src += "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    args = []
    for name, (dt, size) in zip(in_names, inputs):
        args.append(f"    const {CUDA_TYPES[dt]}* {name}")
        shp, strd, nd = _shape_info(body, name)
        if shp:
            args.append(f"    const __grid_constant__ Shape {name}_shape")
        if strd:
            args.append(f"    const __grid_constant__ Strides {name}_strides")
        if nd:
            args.append(f"    const __grid_constant__ int {name}_ndim")
    for name, dt in zip(out_names, outputs):
        args.append(f"    {CUDA_TYPES[dt]}* {name}")
    src += f"__global__ void {fname}(\n" + ",\n".join(args) + ") {\n"
    for name, v in template:
        if isinstance(v, bool):
            src += f"  constexpr bool {name} = {_targ_str(v)};\n"
        elif isinstance(v, int):
            src += f"  constexpr int {name} = {v};\n"
        else:
            src += f"  using {name} = {CUDA_TYPES[v]};\n"
    src += "\n" + body + "\n}\n\n} // namespace mlx::core::cu\n"
    return src


def _name(dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def dispatched():
    """Every distinct instantiation (kernel, inputs [(dtype, size)], outputs [dtype],
    template [(name, value)]) that clsa_mlx/kernels.py launches over the shapes our models
    use: decode (one query row: MLX declares inputs under 8 elements `constant`) and
    prefill, one and many batch rows, short and long caches, the shipped model's dims
    (index dim 32, head dim 64, G = 2), every sparse-attention warp / group / head-dim
    choice. Found by running the dispatch with kernels that record their launch."""
    seen = {}

    def recorder(be, name):
        def launch(inputs, output_shapes, output_dtypes, template=(), **_):
            ins = tuple((_name(a.dtype), 1 if a.size < 8 else 8) for a in inputs)
            tmpl = tuple((n, v if isinstance(v, int) else _name(v)) for n, v in template)
            seen.setdefault((name, ins, tuple(map(_name, output_dtypes)), tmpl), None)
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]

        return launch

    dtypes = (mx.float32, mx.float16, mx.bfloat16)
    with mock.patch.object(kernels, "_kernel", recorder):
        for dt in dtypes:
            for D in (32, 64, 128):
                for B, L, T in ((1, 1, 100), (1, 1, 5000), (64, 1, 5000), (1, 2, 300), (1, 7, 300), (8, 5, 300), (4, 7, 9000)):
                    q, kk = mx.zeros((B, L, D), dt), mx.zeros((B, T, D), dt)
                    kernels.route(q, kk, 16, T - L, "metal")
                    kernels.route(q, kk, 16, T - L, "metal", mx.zeros((B,), mx.int32))
            for HD in (64, 128):
                for B in (1, 4):
                    keys = mx.zeros((B, 2, 300, HD), dt)
                    kernels.gather_kv(mx.zeros((B, 16), mx.int32), keys, keys, "metal")
            for HD in (64, 128, 256):
                for G in (1, 2, 4, 5, 8):
                    q, keys = mx.zeros((1, 2 * G, 3, HD), dt), mx.zeros((1, 2, 40, HD), dt)
                    if kernels.sparse_attention_supported(q, keys, keys):
                        kernels.sparse_attention(q, keys, keys, mx.zeros((1, 3, 8), mx.int32), 0.1, "metal")
    return [(k, list(i), list(o), list(t)) for k, i, o, t in seen]


def instance_id(kernel, inputs, outputs, template):
    consts = "".join("c" if size < 8 else "d" for _, size in inputs)
    return f"{kernel}-" + "-".join(_targ_str(v) for _, v in template) + f"-{consts}"


def opencl_unit(kernel, inputs, outputs, template, fname, with_header=True):
    """The Metal unit as one plain OpenCL kernel (clang takes no kernel templates): the
    template values as constants, the attributes as locals, the same address spaces."""
    header, body = kernels.kernel_text("metal", kernel)
    _, in_names, out_names = kernels.KERNELS[kernel]
    args = []
    for name, (dt, size) in zip(in_names, inputs):
        args.append(f"  const {'constant' if size < 8 else 'device'} {METAL_TYPES[dt]}* {name}")
        shp, strd, nd = _shape_info(body, name)
        args += [f"  const constant int* {name}_shape"] if shp else []
        args += [f"  const constant int64_t* {name}_strides"] if strd else []
        args += [f"  const int {name}_ndim"] if nd else []  # MLX: `constant int&`; OpenCL takes no references
    args += [f"  device {METAL_TYPES[dt]}* {name}" for name, dt in zip(out_names, outputs)]
    lines = [f"  const {ty} {attr} = ({ty})(0u);" for attr, ty in METAL_ATTRIBUTES.items() if attr in body]
    for name, v in template:
        lines.append(f"  using {name} = {METAL_TYPES[v]};" if isinstance(v, str) else f"  constexpr int {name} = {v};")
    src = header if with_header else ""
    return src + f"__kernel void {fname}(\n" + ",\n".join(args) + ") {\n" + "\n".join(lines) + "\n" + body + "\n}\n"


_SCALAR_BYTES = {"i8": 1, "i16": 2, "half": 2, "i32": 4, "float": 4, "i64": 8, "double": 8}


def _type_bytes(t: str) -> int:
    t = t.strip()
    m = re.fullmatch(r"\[(\d+) x (.+)\]", t)
    return int(m.group(1)) * _type_bytes(m.group(2)) if m else _SCALAR_BYTES[t]


def threadgroup_bytes(ir: str) -> dict:
    """Threadgroup (OpenCL local, LLVM address space 3) bytes per kernel in LLVM IR, from
    the kernel-scope statics clang names `_ZZ<len><kernel>E<len><var>`."""
    out = {}
    for m in re.finditer(r"^@_ZZ(\d+)(\w+?) = internal addrspace\(3\) global (.+?) undef", ir, re.M):
        n, rest = int(m.group(1)), m.group(2)
        out[rest[:n]] = out.get(rest[:n], 0) + _type_bytes(m.group(3))
    return out
