"""Compile checks of every kernel instantiation the dispatch produces, on any machine
(tests/kernel_units.py builds the units; each check skips when its compiler is absent).

- CUDA: the unit MLX's `cuda_kernel` hands to NVRTC, compiled with nvcc for sm_90.
- Metal, types: the unit MLX's `metal_kernel` compiles, checked by `clang++ -std=c++14`
  (Metal up to 3.2 is C++14-based) against tests/shims/metal_shim.h.
- Metal, address spaces: the same text as C++ for OpenCL 2021 with the generic address
  space off, against tests/shims/metal_opencl_shim.h, and each kernel's threadgroup bytes
  read from the compiled IR and held to Metal's 32 KB.
- Each check fails on bugs injected on purpose (`test_checks_catch_injected_bugs`).
See metal/README.md for what these prove and what only a Mac can.
"""

import shutil
import subprocess

import pytest
from kernel_units import (
    SHIMS,
    cuda_unit,
    dispatched,
    instance_id,
    metal_unit,
    opencl_unit,
    threadgroup_bytes,
)

from clsa_mlx import kernels

INSTANCES = dispatched()
METAL_THREADGROUP_LIMIT = 32 * 1024


def _clang():
    return next((n for n in ("clang++", "clang") if shutil.which(n)), None)


needs_clang = pytest.mark.skipif(_clang() is None, reason="clang not installed (apt-get install clang)")


def _run(cmd, src, tmp_path, suffix):
    path = tmp_path / f"unit{suffix}"
    path.write_text(src)
    res = subprocess.run(cmd + [str(path)], capture_output=True, text=True, timeout=600)
    return res.returncode, res.stdout, res.stderr[-6000:]


def _units(build, instances):
    # One unit with every instantiation (names made unique), to pay the compiler's start-up once.
    return "\n".join(
        build(*inst, fname=f"custom_kernel_clsa_{inst[0]}_{i}", with_header=i == 0)
        for i, inst in enumerate(instances)
    )


def cuda_check(tmp_path, instances):
    unique = {(k, tuple(d for d, _ in i), tuple(o), tuple(t)): (k, i, o, t) for k, i, o, t in instances}
    cmd = ["nvcc", "-c", "-std=c++17", "-arch=sm_90", f"-I{SHIMS}", "-o", str(tmp_path / "k.o"), "-x", "cu"]
    return _run(cmd, _units(cuda_unit, list(unique.values())), tmp_path, ".cu")[::2]


def metal_types_check(tmp_path, instances):
    cmd = [_clang(), "-x", "c++", "-std=c++14", "-fsyntax-only", "-Werror=c++17-extensions",
           "-Wno-unknown-attributes", "-Werror=return-type", "-include", str(SHIMS / "metal_shim.h")]
    return _run(cmd, _units(metal_unit, instances), tmp_path, ".cpp")[::2]


def metal_address_space_check(tmp_path, instances):
    """(rc, errors): clang's OpenCL compile, then the threadgroup bytes of every kernel."""
    cmd = [_clang(), "-x", "clcpp", "-cl-std=clc++2021", "-target", "spir64", "-O0", "-S", "-emit-llvm",
           "-Xclang", "-cl-ext=-__opencl_c_generic_address_space,-__opencl_c_pipes,-__opencl_c_device_enqueue",
           "-Werror=return-type", "-include", str(SHIMS / "metal_opencl_shim.h"), "-o", "-"]
    names = [f"custom_kernel_clsa_{inst[0]}_{i}" for i, inst in enumerate(instances)]
    rc, ir, err = _run(cmd, _units(opencl_unit, instances), tmp_path, ".clcpp")
    if rc:
        return rc, err
    used = threadgroup_bytes(ir)
    over = {instance_id(*inst): used[n] for n, inst in zip(names, instances) if used.get(n, 0) > METAL_THREADGROUP_LIMIT}
    missing = [n for n in names if n.startswith(("custom_kernel_clsa_route", "custom_kernel_clsa_sparse")) and n not in used]
    return (1, f"threadgroup bytes over 32 KB: {over}; none found for {missing}") if over or missing else (0, "")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_instantiations_compile(tmp_path):
    rc, err = cuda_check(tmp_path, INSTANCES)
    assert rc == 0, err


@needs_clang
def test_metal_instantiations_typecheck_as_cpp14(tmp_path):
    rc, err = metal_types_check(tmp_path, INSTANCES)
    assert rc == 0, err


@needs_clang
def test_metal_address_spaces_and_threadgroup_bytes(tmp_path):
    rc, err = metal_address_space_check(tmp_path, INSTANCES)
    assert rc == 0, err


def test_dispatch_covers_decode_and_shipped_shapes():
    ids = {instance_id(*inst) for inst in INSTANCES}
    # decode with one batch row: `start` is `constant`
    assert {"route_write-256-0-ddcd", "route_hist-3-256-0-ddcd", "route_score-float16-float16-64-512-dddc"} <= ids
    # many rows, `start` in device memory
    assert {"route_write-256-1-dddd", "route_hist-1-256-1-dddd", "route_hist0-256-ddd"} <= ids
    assert any(i.startswith("route_score-bfloat16-bfloat16-32-512") for i in ids)
    assert any(i.startswith("sparse_attention-float16-64-2-") for i in ids)
    assert len({i for i in ids if i.startswith("sparse_attention")}) == 45


# (file, text, replacement, check that must fail): Metal bugs that compile as plain C++.
MUTATIONS = {
    "thread array as threadgroup scratch": ("route_hist.inc", "SHARED uint ws[NW + 1];", "uint ws[NW + 1];", "as"),
    "device array as threadgroup scratch": (
        "route_write.inc", "lane, warp, ws);", "lane, warp, (device uint*)idx);", "as"),
    "atomic on thread memory": ("route_hist0.inc", "SHARED SHARED_ATOMIC_UINT h[", "SHARED_ATOMIC_UINT h[", "as"),
    "store through constant": ("gather_kv.inc", "const int K = prm[0]", "((constant int*)prm)[0] = 0;\n  const int K = prm[0]", "as"),
    "threadgroup pointer to a device parameter": (
        "common.h", "template <int NWARPS>", "FN void put(device uint* p) { p[0] = 0u; }\ntemplate <int NWARPS>", "as",
        ("route_write.inc", "  SHARED uint ws[NW + 1];", "  SHARED uint ws[NW + 1];\n  put(ws);"),
    ),
    "threadgroup array over 32 KB": ("route_write.inc", "SHARED uint sel[2];", "SHARED uint sel[9000];", "as"),
    "SHARED_PTR(T) as T*": ("dialect_metal.h", "#define SHARED_PTR(T) threadgroup T*", "#define SHARED_PTR(T) T*", "as"),
    "device helper on a constant input": (
        "common.h", "template <int NWARPS>", "FN int first(const device int* p) { return p[0]; }\ntemplate <int NWARPS>", "as",
        ("route_write.inc", "  SHARED uint ws[NW + 1];", "  SHARED uint ws[NW + 1];\n  const int s0 = first(start);"),
    ),
    "C++17 in a kernel": ("route_hist.inc", "constexpr int NW = TG / 32;", "constexpr int NW = TG / 32;\n  if constexpr (NW > 1) {}", "types"),
}


@needs_clang
@pytest.mark.parametrize("bug", list(MUTATIONS))
def test_checks_catch_injected_bugs(bug, tmp_path, monkeypatch):
    file, *edits = MUTATIONS[bug]
    edits = [(file, *edits[:2])] + [tuple(e) for e in edits[3:]]
    check = metal_address_space_check if MUTATIONS[bug][3] == "as" else metal_types_check
    read = kernels._read

    def mutated(name):
        text = read(name)
        for f, old, new in edits:
            if f == name:
                assert old in text, (name, old)
                text = text.replace(old, new)
        return text

    monkeypatch.setattr(kernels, "_read", mutated)
    touched = {f for f, _, _ in edits}
    mine = [i for i in INSTANCES if kernels.KERNELS[i[0]][0] in touched] or INSTANCES
    assert check(tmp_path, mine)[0] != 0
    if check is metal_address_space_check:  # the plain C++ check does not see these
        assert metal_types_check(tmp_path, mine)[0] == 0


def test_sources_mostly_shared():
    """The per-backend dialect is small next to the shared algorithm text."""
    d = kernels.SOURCE_DIR
    shared = sum(len((d / f).read_text()) for f in ["common.h"] + [v[0] for v in kernels.KERNELS.values()])
    for be in ("metal", "cuda"):
        own = len((d / f"dialect_{be}.h").read_text()) + len((d / f"prologue_{be}.inc").read_text())
        assert shared / (shared + own) >= 0.9, (be, shared, own)


def test_no_program_scope_variables():
    """Metal takes program-scope variables only in `constant` memory, which neither plain C++
    nor OpenCL's program-scope globals check: the shared headers declare none."""
    import re

    d = kernels.SOURCE_DIR
    for f in ("common.h", "dialect_metal.h", "dialect_cuda.h"):
        bad = re.findall(r"^(?:static\s+)?(?:constexpr|const)\s+[\w:<>]+\s+\w+\s*(?:=|\[|;)", (d / f).read_text(), re.M)
        assert not bad, (f, bad)
