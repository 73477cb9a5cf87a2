"""The test-only extension splinet_cuda._emulation (tests/cpp/cuda_emulated.cpp): the CUDA
layer drivers and block programs run on the CPU, as the ops
torch.ops.splinet_cuda_emulation.cuda_{dense,conv}_{fwd,bwd}_emulated, with the race check's
barrier probe emulation_barriers (tests/test_races.py). `make build-test` builds it
(SPLINET_EMULATION=1); a user's install does not. This module loads it and registers the fake
implementations that torch.library.opcheck needs.

Under `make test` (SPLINET_REQUIRE_EMULATION=1) a missing extension is an error, not skipped
tests: the emulation is how CI tests the CUDA kernels' arithmetic."""
import os

import torch

from splinet_cuda._ops import layer_bwd_fake, layer_fwd_fake

try:
    import splinet_cuda._emulation  # noqa: F401  (loading the library registers the ops)

    LOAD_ERROR = None
except ImportError as exc:
    LOAD_ERROR = exc
    if os.environ.get("SPLINET_REQUIRE_EMULATION") == "1":
        raise ImportError("splinet_cuda._emulation is not built (make build-test, or SPLINET_EMULATION=1 "
                          f"when installing): {exc}") from exc

AVAILABLE = LOAD_ERROR is None
SKIP_REASON = f"the test-only extension splinet_cuda._emulation is not built: {LOAD_ERROR}"
ops = torch.ops.splinet_cuda_emulation


def _fwd_fake(*args):  # layer arguments, then the emulation's (path, tile_rows, blocks, threads)
    return layer_fwd_fake(*args[:11])


def _bwd_fake(*args):
    return layer_bwd_fake(*args[:12])


if AVAILABLE:
    for _layer in ("dense", "conv"):
        torch.library.register_fake(f"splinet_cuda_emulation::cuda_{_layer}_fwd_emulated", _fwd_fake)
        torch.library.register_fake(f"splinet_cuda_emulation::cuda_{_layer}_bwd_emulated", _bwd_fake)
