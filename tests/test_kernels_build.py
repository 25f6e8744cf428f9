"""Compile checks of the kernel instantiations, on any machine.

CUDA: the translation unit MLX's `cuda_kernel` would hand to NVRTC (same default
header, namespace, signature and template constants; `mlx/backend/cuda/device/utils.cuh`
replaced by a stub in tests/shims with the types the signature names), compiled with
nvcc for sm_90, compile only.

Metal: the translation unit MLX's `metal_kernel` would compile (signature with
`[[buffer(i)]]` arguments, Metal attributes found by name in the body, template and
explicit instantiation), checked with `clang++ -fsyntax-only` against
tests/shims/metal_shim.h. See metal/README.md for what this can and cannot catch.

Each check skips with its reason when the compiler is absent.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

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


def _instances():
    """(kernel, inputs [(dtype, size)], outputs [dtype], template [(name, value)]),
    with the argument kinds the dispatch in clsa_mlx/kernels.py passes (the routing `start`
    of one batch row is small enough for MLX to declare it `constant`, of 64 rows `device`)."""
    big, prm8, prm = 1 << 20, 8, 3
    out = []
    for qt in ("float32", "float16", "bfloat16"):
        out.append(
            (
                "route_score",
                [(qt, big), (qt, big), ("int32", prm8), ("int32", 1)],
                ["float32", "uint32"],
                [("QT", qt), ("KT", qt), ("D", 128), ("TG", kernels._TG_SCORE)],
            )
        )
    out.append(("route_hist0", [("float32", big), ("int32", prm8), ("int32", 64)], ["uint32"], [("TG", 256)]))
    for level in (1, 2, 3):
        prev = [("int32", prm8)] * 2 if level == 1 else [("uint32", 64)] * 2
        out.append(
            (
                "route_hist",
                [("float32", big), ("int32", prm8), ("int32", 1), ("uint32", big)] + prev,
                ["uint32"] * 3,
                [("LEVEL", level), ("TG", 256)],
            )
        )
    out.append(
        (
            "route_select",
            [("uint32", big), ("int32", prm8), ("uint32", 64), ("uint32", 64)],
            ["uint32"] * 3,
            [],
        )
    )
    out.append(
        (
            "route_write",
            [("float32", big), ("int32", prm8), ("int32", 64)] + [("uint32", 64)] * 3,
            ["int32"],
            [("TG", 256)],
        )
    )
    for dt in ("float32", "float16", "bfloat16"):
        out.append(
            (
                "gather_kv",
                [("int32", 2048), (dt, big), (dt, big), ("int32", 2)],
                [dt, dt],
                [("DT", dt), ("HD", 128)],
            )
        )
        for g, hd in ((1, 128), (5, 128), (4, 64)):
            out.append(
                (
                    "sparse_attention",
                    [(dt, big), (dt, big), (dt, big), ("int32", big)]
                    + [("int32", prm), ("float32", 1)],
                    [dt],
                    [("DT", dt), ("HD", hd), ("G", g), ("NW", kernels.attention_warps(g, hd))],
                )
            )
    return out


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


def _ids():
    return [f"{k}-" + "-".join(_targ_str(v) for _, v in t) for k, _, _, t in _instances()]


def _compile(cmd, src, tmp_path, suffix):
    path = tmp_path / f"unit{suffix}"
    path.write_text(src)
    res = subprocess.run(cmd + [str(path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr[-6000:]}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_instantiations_compile(tmp_path):
    # One translation unit with every instantiation (kernel names made unique), to
    # pay nvcc's start-up once.
    units = []
    for i, (kernel, ins, outs, tmpl) in enumerate(_instances()):
        # Unique names so all instantiations share one unit; header once.
        fname = f"custom_kernel_clsa_{kernel}_{i}"
        units.append(cuda_unit(kernel, ins, outs, tmpl, fname, with_header=i == 0))
    cmd = ["nvcc", "-c", "-std=c++17", "-arch=sm_90", f"-I{SHIMS}", "-o", str(tmp_path / "k.o")]
    _compile(cmd + ["-x", "cu"], "\n".join(units), tmp_path, ".cu")


def _clang():
    for name in ("clang++", "clang"):
        if shutil.which(name):
            return name
    return None


@pytest.mark.skipif(_clang() is None, reason="clang not installed (apt-get install clang)")
def test_metal_instantiations_syntax(tmp_path):
    units = []
    for i, (kernel, ins, outs, tmpl) in enumerate(_instances()):
        fname = f"custom_kernel_clsa_{kernel}_{i}"
        units.append(metal_unit(kernel, ins, outs, tmpl, fname, with_header=i == 0))
    cmd = [
        _clang(),
        "-x",
        "c++",
        "-std=c++17",
        "-fsyntax-only",
        "-Wno-unknown-attributes",
        "-Werror=return-type",
        "-include",
        str(SHIMS / "metal_shim.h"),
    ]
    _compile(cmd, "\n".join(units), tmp_path, ".cpp")


def test_sources_mostly_shared():
    """The per-backend dialect is small next to the shared algorithm text."""
    d = kernels.SOURCE_DIR
    shared = sum(len((d / f).read_text()) for f in ["common.h"] + [v[0] for v in kernels.KERNELS.values()])
    for be in ("metal", "cuda"):
        own = len((d / f"dialect_{be}.h").read_text()) + len((d / f"prologue_{be}.inc").read_text())
        assert shared / (shared + own) >= 0.9, (be, shared, own)
