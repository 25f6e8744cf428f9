"""The kernels' runtime safety net, simulated on the CPU: a kernel that fails to build,
exceeds its thread limit or answers wrong falls back to its reference with one warning
line, and the model's output is the reference's."""

import logging

import mlx.core as mx
import pytest

from clsa_mlx import kernels, sparse
from clsa_mlx.model import Model
from clsa_mlx.tiny import tiny_args

BUILD_ERROR = "[metal::Device] Unable to build metal library from source\nprogram_source:12:3: error: ..."
THREAD_ERROR = "Thread group size (1024) is greater than  the maximum allowed threads per threadgroup (896)."  # MLX's words


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(sparse, "_verdicts", {})
    yield


def run_model(seed=0, **overrides):
    """Prefill past k then decode a few tokens; the logits of every step."""
    mx.random.seed(seed)
    model = Model(tiny_args(**overrides))
    cache, outs = model.make_cache(), []
    tokens = mx.random.randint(0, 200, (1, 40), key=mx.random.key(seed))
    outs.append(model(tokens, cache=cache))
    for t in range(3):
        outs.append(model(tokens[:, t : t + 1], cache=cache))
    mx.eval(outs)
    return outs


def fake_kernels(monkeypatch, make):
    """Pretend a Metal GPU is there, with `make(name)` standing in for each kernel."""
    monkeypatch.setattr(kernels, "backend", lambda: "metal")
    monkeypatch.setattr(kernels, "_kernel", lambda be, name: make(name))


def raising(exc):
    def kernel(**_):
        raise exc

    return kernel


def zeros(**kw):  # a kernel that runs and writes nothing useful
    return [mx.zeros(s, d) for s, d in zip(kw["output_shapes"], kw["output_dtypes"])]


def reference_logits(monkeypatch):
    with monkeypatch.context() as m:  # the references, also on a machine with a GPU
        m.setattr(kernels, "backend", lambda: None)
        return run_model()


def assert_same(got, want):
    for a, b in zip(got, want):
        assert mx.array_equal(a, b)


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "clsa_mlx"]


def test_build_error_falls_back_with_one_line_per_instantiation(monkeypatch, caplog):
    want = reference_logits(monkeypatch)
    fake_kernels(monkeypatch, lambda name: raising(RuntimeError(BUILD_ERROR)))
    with caplog.at_level(logging.WARNING, logger="clsa_mlx"):
        assert_same(run_model(), want)
        assert_same(run_model(), want)  # a second model in the process: no new tests, no new lines
    lines = warnings_of(caplog)
    # prefill routing (matmul scores), decode routing + gather, prefill sparse attention
    assert {line.split(" (")[0] for line in lines} == {
        "clsa_mlx: kernel route", "clsa_mlx: kernel select_kv", "clsa_mlx: kernel sparse_attention"
    }
    assert len(lines) == len(sparse.fallbacks()) == 3
    for line in lines:
        assert "\n" not in line and "Unable to build metal library from source" in line
        assert "falls back to the MLX reference" in line and "metal, " in line


def failing_at_eval(**kw):
    """Outputs whose evaluation raises, as a Metal library that fails to build does: MLX
    encodes the outputs' fills, then the build error surfaces inside mx.eval."""
    broken = mx.linalg.inv(mx.zeros((1, 1)), stream=mx.cpu)[0, 0]  # raises only when evaluated
    return [mx.zeros(s, d) + broken.astype(d) for s, d in zip(kw["output_shapes"], kw["output_dtypes"])]


def test_build_error_at_eval_time_falls_back(monkeypatch, caplog):
    want = reference_logits(monkeypatch)
    out = failing_at_eval(output_shapes=[(2,)], output_dtypes=[mx.float32])  # the call itself passes
    with pytest.raises(RuntimeError):
        mx.eval(out)
    fake_kernels(monkeypatch, lambda name: failing_at_eval)
    with caplog.at_level(logging.WARNING, logger="clsa_mlx"):
        assert_same(run_model(), want)
        assert_same(run_model(), want)
    lines = warnings_of(caplog)
    assert len(lines) == len(sparse.fallbacks()) == 3
    assert all("RuntimeError" in line and "LU factorization failed" in line for line in lines)


def test_thread_limit_error_in_one_launch_names_it(monkeypatch, caplog):
    want = reference_logits(monkeypatch)
    fake_kernels(monkeypatch, lambda name: raising(ValueError(THREAD_ERROR)) if name == "route_write" else zeros)
    with caplog.at_level(logging.WARNING, logger="clsa_mlx"):
        assert_same(run_model(), want)
    lines = warnings_of(caplog)
    routing = [line for line in lines if "kernel route " in line or "kernel select_kv " in line]
    assert len(routing) == 2 and all("ValueError" in line and "Thread group size (1024)" in line for line in routing)
    # the attention kernel ran (zeros) and was caught by its comparison instead
    assert any("kernel sparse_attention" in line and "max error" in line for line in lines)


def test_wrong_answers_fall_back(monkeypatch, caplog):
    want = reference_logits(monkeypatch)
    fake_kernels(monkeypatch, lambda name: zeros)
    with caplog.at_level(logging.WARNING, logger="clsa_mlx"):
        assert_same(run_model(), want)
    reasons = sorted(sparse.fallbacks().values())
    assert reasons[0] == "gathered rows differ from the reference"
    assert reasons[1] == "index lists differ from the reference"
    assert reasons[2].startswith("max error")


def test_kernels_that_pass_stay_in_use(monkeypatch, caplog):
    want = reference_logits(monkeypatch)
    monkeypatch.setattr(kernels, "backend", lambda: "metal")
    calls = {"route": 0, "select_kv": 0, "sparse_attention": 0}

    def stand_in(name, ref):  # the kernel's signature, the reference's answer
        def kernel(*args, **kw):
            calls[name] += 1
            return ref(*(a for a in args if not isinstance(a, str)), **kw)

        return kernel

    for name, ref in [("route", sparse.route_ref), ("select_kv", sparse.select_kv_ref),
                      ("sparse_attention", sparse.sparse_attention_ref)]:
        monkeypatch.setattr(kernels, name, stand_in(name, ref))

    with caplog.at_level(logging.WARNING, logger="clsa_mlx"):
        assert_same(run_model(), want)
    assert not warnings_of(caplog) and not sparse.fallbacks()
    # one self-test each, then the model's own calls: 3 decode steps through select_kv,
    # prefill routing and attention in each of the cross layers
    assert calls["select_kv"] == 1 + 3
    assert calls["route"] > 1 and calls["sparse_attention"] > 1


@pytest.mark.parametrize("route", [sparse.route_ref, lambda *a: kernels.route(*a, "metal")])
def test_routing_refuses_k_below_one(route):
    with pytest.raises(ValueError, match="routing needs k >= 1, got 0"):
        route(mx.ones((1, 1, 4)), mx.ones((1, 5, 4)), 0, 4)


def test_attention_kernel_gradients_go_through_the_reference(monkeypatch):
    # the stand-in kernel passes no gradient itself: any gradient must come from the VJP
    monkeypatch.setattr(kernels, "backend", lambda: "metal")
    monkeypatch.setattr(kernels, "sparse_attention",
                        lambda q, k, v, idx, scale, be: mx.stop_gradient(sparse.sparse_attention_ref(q, k, v, idx, scale)))
    B, H, G, L, T, HD = 1, 2, 2, 5, 40, 16
    q, k, v = (mx.random.normal(s, key=mx.random.key(i)) for i, s in
               enumerate([(B, H * G, L, HD), (B, H, T, HD), (B, H, T, HD)]))
    idx = sparse.route_ref(mx.random.normal((B, L, 8)), mx.random.normal((B, T, 8)), 8, T - L)
    w = mx.random.normal((B, H * G, L, HD), key=mx.random.key(9))
    loss = lambda f: lambda q, k, v: (f(q, k, v, idx, HD**-0.5) * w).sum()  # noqa: E731
    got = mx.grad(loss(sparse.sparse_attention), argnums=(0, 1, 2))(q, k, v)
    want = mx.grad(loss(sparse.sparse_attention_ref), argnums=(0, 1, 2))(q, k, v)
    assert not sparse.fallbacks()
    for a, b in zip(got, want):
        assert float(mx.abs(b).max()) > 0 and mx.allclose(a, b, atol=1e-5)


def test_inputs_small_enough_for_constant_memory_take_the_references(monkeypatch):
    # MLX passes an input of under 8 elements in constant memory, a library of its own that no
    # probe builds: such calls take the references and start no self-test.
    fake_kernels(monkeypatch, lambda name: raising(AssertionError("no kernel for these inputs")))
    kv = mx.random.normal((1, 1, 10, 16))
    idx = mx.array([[[0, 3, 5, -1]]])
    got = sparse.sparse_attention(mx.ones((1, 1, 1, 16)), kv, kv, idx, 0.25)
    assert mx.array_equal(got, sparse.sparse_attention_ref(mx.ones((1, 1, 1, 16)), kv, kv, idx, 0.25))
    sparse.route(mx.ones((1, 1, 4)), mx.ones((1, 10, 4)), 2, 9)  # index dim 4
    sparse.select_kv(mx.ones((1, 1, 16)), mx.ones((1, 10, 16)), kv, kv, 4)  # 4 slots: idx [1, 4]
    assert not sparse._verdicts
