"""The Triton backend against the pure-PyTorch reference: forward and every gradient over
variants / schemes / activations / degrees, odd shapes, checkpointing, the dense layer's
large-width GEMM path (forced on small widths with small tiles), the triton_op registration
run eagerly, dispatch and launch-side state. The ops' opcheck and torch.compile checks are in
test_contract.py.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1,
set by conftest.py before triton is imported), with tiny shapes.

Legend: B batch, m width, C channels, n = L + d coefficients, d degree, N steps.
"""
import functools
import itertools

import pytest
import torch

pytest.importorskip("triton")

import splinet_cuda as sc  # noqa: E402
from helpers import (ACTS, VARIANTS, assert_equal_results, assert_matches_reference, backend_device,  # noqa: E402
                     check_dense_op_rejects_bad_args, conv_inputs, dense_inputs, grid, grid_id, outputs_and_grads,
                     requires)
from splinet_cuda import _triton  # noqa: E402

pytestmark = [requires("triton"), pytest.mark.gpu]

DEVICE = backend_device("triton")


def make(B, m, L, d, *, dtype=torch.float64, bias=True, learn_scale=True, seed=0):
    return dense_inputs(B, m, L, d, dtype=dtype, device=DEVICE, bias=bias, learn_scale=learn_scale, seed=seed)


def make_conv(*, B=2, C=3, HW=(5, 4), L=2, d=2, k=3, dtype=torch.float64, bias=True, seed=0):
    return conv_inputs(2, B=B, C=C, spatial=HW, L=L, d=d, k=k, dtype=dtype, device=DEVICE, bias=bias, seed=seed)


dense = functools.partial(sc.spline_ode, backend="triton")
conv = functools.partial(sc.spline_ode_conv, backend="triton")
run = outputs_and_grads


def assert_match(args, dtype=None, conv=False, **kw):
    """The triton backend against the reference computed in float64 on the same values."""
    ref_args = [t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args]
    assert_matches_reference(sc.spline_ode_conv if conv else sc.spline_ode, args, backend="triton", dtype=dtype,
                             ref_args=ref_args, **kw)


# --- dense ------------------------------------------------------------------------------

# Every variant x scheme x activation, degree and bias cycling through the grid.
GRID = grid(VARIANTS)


@pytest.mark.parametrize("variant,scheme,activation,degree,bias", GRID, ids=[grid_id(c) for c in GRID])
def test_dense_matches_reference_float64(variant, scheme, activation, degree, bias):
    args = make(5, 3, 2, degree, bias=bias)
    assert_match(args, steps=3, degree=degree, activation=activation, scheme=scheme, variant=variant, gamma=0.2)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
@pytest.mark.parametrize("B,m,N", [(1, 1, 1), (7, 3, 2), (1, 5, 1), (7, 17, 2)])
def test_dense_odd_shapes_float32(degree, B, m, N):
    args = make(B, m, 2, degree, dtype=torch.float32)
    assert_match(args, dtype=torch.float32, steps=N, degree=degree, activation="tanh", scheme="rk4",
                 variant=["standard", "symmetric", "antisymmetric"][degree % 3], gamma=0.1)


@pytest.mark.parametrize("learn_scale,bias", [(True, False), (False, True), (False, False)])
def test_dense_scale_and_bias_options(learn_scale, bias):
    args = make(4, 3, 2, 1, bias=bias, learn_scale=learn_scale)
    assert_match(args, steps=3, degree=1, activation="sigmoid", scheme="euler", variant="symmetric")


def test_dense_many_tiles():
    """More rows than one batch tile, so several programs and the partial-gradient reduction."""
    args = make(70, 5, 3, 2, dtype=torch.float32)
    assert_match(args, dtype=torch.float32, steps=3, degree=2, activation="softplus", scheme="midpoint",
                 variant="standard")


def test_dense_trajectory():
    args = make(3, 4, 2, 3)
    kw = dict(steps=4, degree=3, activation="softplus", scheme="midpoint", variant="symmetric")
    assert_match(args, return_trajectory=True, **kw)
    traj = sc.spline_ode(*args, backend="triton", return_trajectory=True, **kw)
    assert traj.shape == (5, 3, 4)
    torch.testing.assert_close(traj[0], args[0].detach())


@pytest.mark.parametrize("checkpoint", [2, 3, 9])
def test_dense_checkpointing_is_exact(checkpoint):
    """Recomputed segments replay the forward bit for bit: gradients equal those of checkpoint=1."""
    args = make(6, 3, 3, 2)
    kw = dict(steps=5, degree=2, activation="tanh", scheme="rk4", variant="standard")
    fn = dense
    full = run(fn, *args, checkpoint=1, **kw)
    ckpt = run(fn, *args, checkpoint=checkpoint, **kw)
    assert_equal_results(full, ckpt)


def test_dense_deterministic():
    args = make(70, 3, 4, 3, dtype=torch.float32)
    kw = dict(steps=3, degree=3, activation="tanh", scheme="euler", variant="standard")
    fn = dense
    first, second = run(fn, *args, **kw), run(fn, *args, **kw)
    assert_equal_results(first, second)


def test_dense_gradcheck():
    x, w, b, s = make(2, 3, 2, 2)
    fn = lambda x, w, b, s: sc.spline_ode(x, w, b, s, steps=2, degree=2, activation="tanh", scheme="midpoint",
                                          variant="antisymmetric", gamma=0.3, backend="triton")
    assert torch.autograd.gradcheck(fn, (x, w, b, s), eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16/fp16 kernels need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_half_precision(dtype):
    args = make(33, 24, 3, 2, dtype=dtype)
    assert_match(args, dtype=dtype, steps=4, degree=2, activation="tanh", scheme="rk4", variant="standard")


def test_dense_empty_batch():
    x, w, b, s = make(0, 3, 2, 1)
    y = sc.spline_ode(x, w, b, s, steps=2, degree=1, backend="triton")
    assert y.shape == (0, 3)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


# --- dense, large-width GEMM path -----------------------------------------------------------
# Forced on small widths with 16-wide tiles, so several K / N tiles, ragged edges and a
# batch that is not a multiple of the batch tile occur (the interpreter is slow).

from splinet_cuda.triton_kernels import dense as tk_dense, dense_gemm as tk_gemm  # noqa: E402


@pytest.fixture
def gemm_path(monkeypatch):
    monkeypatch.setattr(tk_dense, "FORCE_PATH", "gemm")
    monkeypatch.setattr(tk_gemm, "BLOCKS_OVERRIDE", (16, 16, 16))
    return monkeypatch


# Every variant x {euler, rk4} x activation; degree, bias, width and checkpoint cycle. Widths
# 17 and 20 make two 16-wide tiles with a ragged edge (a third tile adds no case, only
# interpreter minutes).
GEMM_GRID = [(v, s, a, i % 4, (i // 3) % 2 == 0, (5, 17, 20)[i % 3], (1, 3)[(i // 2) % 2])
             for i, (v, s, a) in enumerate(itertools.product(VARIANTS, ["euler", "rk4"], ACTS))]


@pytest.mark.parametrize("variant,scheme,activation,degree,bias,m,checkpoint", GEMM_GRID,
                         ids=[f"{v}-{s}-{a}-d{d}-{'b' if b else 'nob'}-m{m}-ck{k}"
                              for v, s, a, d, b, m, k in GEMM_GRID])
def test_dense_gemm_path_float32(gemm_path, variant, scheme, activation, degree, bias, m, checkpoint):
    args = make(19, m, 2, degree, dtype=torch.float32, bias=bias)
    assert_match(args, dtype=torch.float32, steps=3, degree=degree, activation=activation, scheme=scheme,
                 variant=variant, gamma=0.2, checkpoint=checkpoint)


@pytest.mark.parametrize("variant,scheme", [("symmetric", "rk4_38"), ("antisymmetric", "midpoint")])
def test_dense_gemm_path_float64_trajectory(gemm_path, variant, scheme):
    """Tight float64 check, with the whole trajectory (dL/d every saved state) as the output."""
    args = make(7, 20, 3, 2)
    assert_match(args, return_trajectory=True, steps=3, degree=2, activation="softplus", scheme=scheme, variant=variant,
                 gamma=0.3)


def test_dense_gemm_path_split_batch_reduction(gemm_path):
    """The weight gradient with the batch split over programs (partials summed by the scatter kernel)."""
    gemm_path.setattr(tk_gemm, "WGRAD_SPLIT_OVERRIDE", 3)
    args = make(37, 20, 2, 1, dtype=torch.float32, learn_scale=False)
    assert_match(args, dtype=torch.float32, steps=2, degree=1, activation="tanh", scheme="midpoint",
                 variant="antisymmetric", gamma=0.1)


def test_dense_gemm_path_checkpointing_is_exact_and_deterministic(gemm_path):
    args = make(19, 20, 3, 2, dtype=torch.float32)
    kw = dict(steps=4, degree=2, activation="tanh", scheme="midpoint", variant="symmetric")
    fn = dense
    full, ckpt, again = run(fn, *args, checkpoint=1, **kw), run(fn, *args, checkpoint=3, **kw), \
        run(fn, *args, checkpoint=3, **kw)
    for a, b, c in zip(full, ckpt, again):
        assert torch.equal(a, b) and torch.equal(b, c)


@pytest.mark.parametrize("path", ["trajectory", "gemm"])
def test_dense_backward_last_only_gradient(monkeypatch, path):
    """dL/dx_N alone gives what the full form with zeros for the other saved states gives."""
    monkeypatch.setattr(tk_dense, "FORCE_PATH", path)
    monkeypatch.setattr(tk_gemm, "BLOCKS_OVERRIDE", (16, 16, 16))
    x, w, b, s = [t.detach() for t in make(5, 17, 2, 1)]
    fwd, bwd = _triton.OPS["dense"]["interp"]
    cfg = (4, 1, "tanh", "midpoint", "standard", 0.0, 2)
    states = fwd(x, w, b, s, *cfg)
    g = torch.randn_like(states[-1])
    full = torch.zeros_like(states)
    full[-1] = g
    for a, c in zip(bwd(g, states, w, b, s, *cfg), bwd(full, states, w, b, s, *cfg)):
        assert torch.equal(a, c)


def test_dense_auto_selects_gemm_path_above_threshold(monkeypatch):
    calls = []
    for name in ("gemm_forward", "gemm_backward"):
        real = getattr(tk_dense, name)
        monkeypatch.setattr(tk_dense, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or
                            _real(*a, **k))
    m = tk_dense.TRAJECTORY_MAX_WIDTH
    assert not tk_dense.uses_gemm(m) and tk_dense.uses_gemm(m + 1)
    args = make(2, m + 1, 1, 1, dtype=torch.float32)
    assert_match(args, dtype=torch.float32, steps=1, degree=1, activation="relu", scheme="euler",
                 variant="standard")
    assert calls == ["gemm_forward", "gemm_backward"]


# --- registration, dispatch ---------------------------------------------------------------

def test_dense_triton_op_eager_matches_custom_op():
    """The triton_op registration (used on CUDA) runs the same launchers eagerly."""
    x, w, b, s = [t.detach() for t in make(4, 3, 2, 2)]
    cfg = (3, 2, "tanh", "rk4", "symmetric", 0.1, 2)
    (nf, nb), (cf, cb) = _triton.OPS["dense"]["native"], _triton.OPS["dense"]["interp"]
    st_n, st_c = nf(x, w, b, s, *cfg), cf(x, w, b, s, *cfg)
    assert torch.equal(st_n, st_c)
    g = torch.randn_like(st_n)
    for a, c in zip(nb(g, st_n, w, b, s, *cfg), cb(g, st_c, w, b, s, *cfg)):
        assert torch.equal(a, c)


def test_auto_never_picks_triton_for_cpu_tensors():
    fn = sc._dispatch._select("auto", "spline_ode", torch.zeros(2, 3))
    assert fn is not _triton.spline_ode_triton
    fn = sc._dispatch._select("auto", "spline_ode_conv", torch.zeros(1, 2, 5, 5))
    assert fn is not _triton.spline_ode_conv_triton


def test_conv_other_than_2d_is_rejected_not_rerouted():
    x, w = torch.randn(2, 3, 8), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="spatial dims"):
        sc.spline_ode_conv(x, w, None, 1.0, steps=2, degree=1, backend="triton")


def test_raw_ops_reject_bad_input():
    check_dense_op_rejects_bad_args(_triton.OPS["dense"]["interp"][0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors run only in the interpreter")
def test_half_on_cpu_rejected():
    x, w = torch.randn(3, 4).half(), torch.randn(5, 4, 4).half()
    with pytest.raises(TypeError, match="dtype"):
        sc.spline_ode(x, w, None, 1.0, steps=3, degree=1, backend="triton")


# --- conv2d -------------------------------------------------------------------------------

CONV_GRID = [("standard", "euler", "relu", 2, True), ("standard", "euler", "tanh", 0, False),
             ("standard", "rk4", "softplus", 3, True), ("symmetric", "euler", "sigmoid", 1, True),
             ("symmetric", "midpoint", "identity", 2, False)]


@pytest.mark.parametrize("variant,scheme,activation,degree,bias", CONV_GRID,
                         ids=[f"{v}-{s}-{a}-d{d}-{'b' if b else 'nob'}" for v, s, a, d, b in CONV_GRID])
def test_conv_matches_reference_float64(variant, scheme, activation, degree, bias):
    args = make_conv(d=degree, bias=bias)
    assert_match(args, conv=True, steps=2, degree=degree, activation=activation, scheme=scheme, variant=variant)


@pytest.mark.parametrize("B,C,HW,k", [(1, 1, (3, 3), 3), (1, 17, (2, 3), 1), (2, 5, (4, 3), 5)])
def test_conv_odd_shapes_float32(B, C, HW, k):
    args = make_conv(B=B, C=C, HW=HW, k=k, d=1, dtype=torch.float32)
    assert_match(args, dtype=torch.float32, conv=True, steps=2, degree=1, activation="tanh", scheme="euler",
                 variant="standard")


def test_conv_checkpointing_and_trajectory():
    args = make_conv(d=2)
    kw = dict(steps=3, degree=2, activation="tanh", scheme="euler", variant="standard")
    fn = conv
    full, ckpt = run(fn, *args, checkpoint=1, **kw), run(fn, *args, checkpoint=2, **kw)
    for a, b in zip(full, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert_match(args, conv=True, return_trajectory=True, **kw)


# --- launch-side state: cached device tables, specialisation, compute dtype ------------------

from splinet_cuda.triton_kernels import _common as tk_common, conv as tk_conv  # noqa: E402


def test_device_tables_built_once_per_configuration(monkeypatch):
    """The second call with the same configuration builds no basis table, parameter table or
    scale scalar (on a GPU each would be a synchronous copy from pageable host memory)."""
    import splinet_cuda._basis as basis

    monkeypatch.setattr(tk_common, "_TABLES", type(tk_common._TABLES)())
    _triton.time_grid.cache_clear()
    calls = []
    real = basis.basis_grid
    monkeypatch.setattr(basis, "basis_grid", lambda *a, **k: calls.append(a) or real(*a, **k))
    x, w, b, _ = make(3, 4, 2, 2)
    for kw in (dict(steps=3, degree=2, scheme="rk4", variant="symmetric"),):
        for attempt in range(2):
            before = dict(tk_common.TABLE_STATS)
            y = sc.spline_ode(x, w, b, 1.3, backend="triton", **kw)
            y.sum().backward()
            made = tk_common.TABLE_STATS["misses"] - before["misses"]
            if attempt == 0:
                assert made == 2 and len(calls) == 1  # basis/parameter tables + the scale scalar
            else:
                assert made == 0 and len(calls) == 1
                assert tk_common.TABLE_STATS["hits"] - before["hits"] >= 3  # forward, backward, scale
    # Another configuration (gamma, steps or dtype) gets its own tables.
    sc.spline_ode(x, w, b, 1.3, steps=4, degree=2, scheme="rk4", backend="triton")
    assert len(calls) == 2


def test_per_launch_integers_are_not_specialised():
    """Integers that change between launches (stage index, batch, steps, segment counts) are in
    do_not_specialize, so Triton compiles one kernel whatever their values (1, multiples of 16)."""
    per_launch = {"idx", "B", "Bn", "N", "CK", "NS", "NSEG", "NCOEF", "NTILES", "KSEG", "BCHUNK", "SPLIT", "NEL",
                  "BMs"}
    kernels = [tk_dense._dense_fwd_kernel, tk_dense._dense_bwd_kernel, tk_gemm._gemm_kernel, tk_gemm._wgrad_kernel,
               tk_gemm._scatter_kernel, tk_gemm._adj_prep_kernel, tk_conv._conv_kernel, tk_conv._conv_wgrad_kernel]
    for kernel in kernels:
        names = {n for n in kernel.arg_names if n in per_launch}
        assert names, kernel.fn.__name__
        if hasattr(kernel, "params"):  # compiled JITFunction
            unspecialised = {p.name for p in kernel.params if p.do_not_specialize}
        else:  # the interpreter keeps the decorator's arguments
            unspecialised = set(kernel.kwargs.get("do_not_specialize") or ())
        assert names <= unspecialised, f"{kernel.fn.__name__}: {sorted(names - unspecialised)} specialised"


def test_conv_bfloat16_state_stays_float32():
    """bf16 layers accumulate in float32 and keep the state in float32 between stages and steps:
    after 6 rk4 steps (24 stages) x_N is within one bf16 ulp of the float64 reference on the
    same (bf16) inputs. A bf16 state between stages drifts by tens of ulps."""
    g = torch.Generator().manual_seed(0)
    B, C, L, d, N = 2, 4, 2, 2, 6
    x = torch.randn(B, C, 5, 5, generator=g).bfloat16()
    w = (torch.randn(L + d, C, C, 3, 3, generator=g) * 0.9 / (C * 9) ** 0.5).bfloat16()
    b = (torch.randn(L + d, C, generator=g) * 0.3).bfloat16()
    s = torch.tensor(1.3).bfloat16()
    states = tk_conv.conv_forward(x, w, b, s, N, d, "tanh", "rk4", "standard", 0.0, N,
                                  grid=_triton.time_grid(N, L + d, d, "rk4"))
    assert states.dtype == torch.bfloat16
    ref = sc.reference.spline_ode_conv(x.double(), w.double(), b.double(), s.double(), steps=N, degree=d,
                                       activation="tanh", scheme="rk4")
    ulps = (states[-1].double() - ref).abs() / (ref.abs().clamp_min(1e-2) * 2.0 ** -8)
    assert ulps.max() <= 1.0, f"x_N off by {ulps.max():.1f} bf16 ulps"


def test_kernels_live_inside_the_package_and_import_nothing_of_it():
    """The kernels are splinet_cuda.triton_kernels (a top-level `triton_kernels` clashes with
    PyPI's triton-kernels and Triton's own library), and they take the tableau and basis as
    arguments: no module of theirs imports splinet_cuda, lazily or not."""
    import ast
    from pathlib import Path

    import splinet_cuda.triton_kernels as tk

    folder = Path(tk.__file__).parent
    assert tk.__name__ == "splinet_cuda.triton_kernels"
    for py in folder.glob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not [n for n in names if n.split(".")[0] == "splinet_cuda"], f"{py.name} imports {names}"
    setup = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    assert '"splinet_cuda.triton_kernels"' in setup and '"triton_kernels"]' not in setup
