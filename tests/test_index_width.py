"""64-bit index arithmetic where an index can pass 2^31, reached without allocating: the basis
header's step and knot indices (a host-only C++ test), and the Triton conv kernels' 64-bit
pixel index, run on a small shape and compared with their 32-bit one.

The C++ CPU kernels and the CUDA programs keep every offset into a tensor (B m N S kept values,
B C spatial planes, trajectory and chunk offsets, workspaces) in int64_t; the remaining int
variables count stages, taps or lanes of a tile, bounded by constants.
"""
import os
import shutil
import subprocess

import pytest
import torch

from helpers import backend_device, conv_inputs, outputs_and_grads, requires

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_basis_indices_past_2_31_host_build(tmp_path):
    """tests/cpp/test_index_width.cpp, built with UBSan where the compiler has it: a step index
    past 2^31 and 2^32 maps to its knot exactly, with no overflow reported."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "test_index_width"
    cmd = [cxx, "-std=c++17", "-O1", f"-I{ROOT}/csrc", f"{ROOT}/tests/cpp/test_index_width.cpp", "-o", str(exe)]
    ubsan = cmd[:2] + ["-fsanitize=undefined", "-fno-sanitize-recover=all"] + cmd[2:]
    if subprocess.run(ubsan, capture_output=True).returncode != 0:  # no UBSan runtime: a plain build
        subprocess.run(cmd, check=True)
    res = subprocess.run([str(exe)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


def test_conv_pixel_index_width_threshold():
    tk_conv = pytest.importorskip("splinet_cuda.triton_kernels.conv")
    assert not tk_conv.conv_index_wide(2**31 // (64 * 64) - 1, 64, 64)
    assert tk_conv.conv_index_wide(2**31 // (64 * 64), 64, 64)  # B H W = 2^31 pixels
    assert tk_conv.conv_index_wide(1, 2**16, 2**15)


@requires("triton")
@pytest.mark.gpu
def test_conv_wide_pixel_index_same_results(monkeypatch):
    """The Triton conv kernels with the 64-bit pixel index (taken from 2^31 pixels) give the
    same bits as with the 32-bit one, forward and every gradient, on a small shape."""
    import splinet_cuda as sc
    from splinet_cuda.triton_kernels import conv as tk_conv

    args = conv_inputs(2, B=2, C=3, spatial=(5, 4), L=2, d=2, k=3, dtype=torch.float32,
                       device=backend_device("triton"))
    kw = dict(steps=3, degree=2, activation="tanh", backend="triton")
    narrow = outputs_and_grads(sc.spline_ode_conv, *args, **kw)
    monkeypatch.setattr(tk_conv, "conv_index_wide", lambda B, H, W: True)
    wide = outputs_and_grads(sc.spline_ode_conv, *args, **kw)
    for a, b in zip(narrow, wide):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
