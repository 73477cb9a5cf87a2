"""Shared test setup: the session's numerics (Triton interpreter, TF32 off, seed) and the
fixtures for the backend axis, the dtype axis and its tolerances. Triton kernels run on CPU
tensors under the interpreter here, so TRITON_INTERPRET must be set before anything imports
triton."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import helpers  # noqa: E402  (tests/ is on sys.path)

# float32 CUDA results are compared with true float32 references: TF32 off for cuDNN
# convolutions (PyTorch's default is on) and for cuBLAS matmuls, for the whole session. The
# legacy flags set cuDNN's conv and RNN precision together (mixing them with the newer
# fp32_precision settings makes torch raise on the next read). The cuda backend's cuDNN path
# follows these flags, as torch.nn.functional.conv2d does.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "backend_op(name): the `backend` fixture skips backends with no kernel of splinet_cuda::<name>")


GPU_BACKENDS = ("cuda", "triton")


def _runs_on_gpu(item) -> bool:
    """Whether a test uses the GPU where there is one: a parameter (the backend / device axis,
    or an op table entry's ``backend``) names the cuda or triton backend or the cuda device.
    Triton tests run their CPU interpreter where no GPU is visible, on the GPU elsewhere."""
    callspec = getattr(item, "callspec", None)
    for value in (callspec.params.values() if callspec is not None else ()):
        name = getattr(value, "backend", value)
        if isinstance(name, str) and name in GPU_BACKENDS:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    """The ``gpu`` marker (``pytest -m gpu``, what ``make gpu-check`` runs) on every test that
    uses the GPU: those parametrized over a GPU backend here, and those marked by hand."""
    for item in items:
        if _runs_on_gpu(item):
            item.add_marker(pytest.mark.gpu)


def pytest_make_parametrize_id(config, val, argname):
    """Readable ids for dtypes wherever a test parametrizes over them ("f32", not "dtype0")."""
    if isinstance(val, torch.dtype):
        return DTYPE_IDS.get(val, str(val).removeprefix("torch."))
    return None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["cpu", "cuda"])
def backend(request):
    """A fused backend name: by default the compiled ones ("cpu", "cuda"); a test or module
    widens or narrows the axis with ``@pytest.mark.parametrize("backend", [...], indirect=True)``.
    A backend that is not built, or has no device here, or (under ``@pytest.mark.backend_op``)
    no kernel of that op, is skipped with the reason."""
    marker = request.node.get_closest_marker("backend_op")
    helpers.skip_unless(request.param, marker.args[0] if marker else None)
    return request.param


@pytest.fixture
def device(backend):
    """The device of the tensors that ``backend`` takes here."""
    return helpers.backend_device(backend)


@pytest.fixture(params=[torch.float64, torch.float32])
def dtype(request):
    """The dtypes every backend takes (bf16/fp16 only on the GPU backends, tested there)."""
    return request.param


@pytest.fixture
def tol(dtype, request):
    """rtol/atol for ``dtype`` against the reference, for the test's backend when it has one."""
    backend = request.getfixturevalue("backend") if "backend" in request.fixturenames else "cpu"
    return helpers.tolerance(dtype, backend)
