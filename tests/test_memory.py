"""The CPU kernels' kept-tensor cache (csrc/cpu/memory.h): bounded, configurable, visible and
releasable; the resident set over many calls of changing shapes stays within its bound.

The resident-set probe runs in a fresh interpreter (this file run as a script), so that what
other tests allocated does not blur it.
"""
import gc
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import splinet_cuda as sc
from splinet_cuda import _ext

needs_cpu_ops = pytest.mark.skipif(not _ext.has_kernel("spline_dense_fwd_saved", "CPU"),
                                   reason="the C++ CPU kernels are not built")

MiB = 1 << 20
DEFAULT_LIMIT = 64 * MiB  # KeptCache::kKeptCacheDefaultBytes
# What else the probe's resident set may gain beyond the cache's bound: glibc keeps freed
# heap memory in its arenas (the main one and one per OpenMP thread, each up to its trim
# threshold, which rises with the blocks freed), torch's allocations of the outputs and
# gradients, oneDNN's and MKL's buffers for the shapes seen. Figures: docs/reliability.md.
RSS_SLACK = 96 * MiB
# The same after glibc's malloc_trim(0) at both ends (its arenas' free memory returned):
# torch's, oneDNN's and MKL's buffers alone.
TRIMMED_SLACK = 32 * MiB


def _dense_step(B, m, N, dtype=torch.float32, seed=0):
    """One forward and backward of the dense layer on the cpu backend, every state kept (the
    path whose kept tensors come from the cache)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, m, dtype=dtype, generator=g)
    w = (0.1 * torch.randn(4, m, m, dtype=dtype, generator=g)).requires_grad_()
    b = torch.zeros(4, m, dtype=dtype, requires_grad=True)
    out = sc.spline_ode(x, w, b, 1.0, steps=N, degree=3, backend="cpu")
    out.sum().backward()
    return out.detach()


def _kept_bytes(B, m, N, elem=4):
    """Bytes of the three kept blocks of one Euler forward (states, kept values, blended
    weights with rows padded to 64 bytes), those of 1 MiB or more."""
    per = 64 // elem
    sizes = [(N + 1) * B * m * elem, N * B * m * elem, N * ((m * m + per - 1) // per * per) * elem]
    return sum(s for s in sizes if s >= MiB)


@pytest.fixture
def limit_restored():
    before = sc.kept_cache_limit()
    yield
    sc.set_kept_cache_limit(before)


def test_public_names_and_docstrings():
    for name in ("kept_cache_bytes", "kept_cache_limit", "set_kept_cache_limit", "empty_kept_cache"):
        assert name in sc.__all__
        assert getattr(sc, name).__doc__


@needs_cpu_ops
def test_bytes_visible_and_released(limit_restored):
    sc.set_kept_cache_limit(DEFAULT_LIMIT)
    sc.empty_kept_cache()
    assert sc.kept_cache_bytes() == 0
    B, m, N = 256, 128, 8
    _dense_step(B, m, N)
    gc.collect()
    held = sc.kept_cache_bytes()
    assert held == _kept_bytes(B, m, N) > 0  # the step's blocks, back in the cache
    _dense_step(B, m, N, seed=1)  # the same sizes: taken from the cache and given back
    assert sc.kept_cache_bytes() == held
    assert f"{held / MiB:.1f} MiB held" in sc.info(file=io.StringIO())
    sc.empty_kept_cache()
    assert sc.kept_cache_bytes() == 0
    assert sc.kept_cache_limit() == DEFAULT_LIMIT  # emptying keeps the bound


@needs_cpu_ops
def test_limit_bounds_and_zero_turns_off(limit_restored):
    sc.set_kept_cache_limit(DEFAULT_LIMIT)
    sc.empty_kept_cache()
    _dense_step(256, 128, 8)
    held = sc.kept_cache_bytes()
    assert held > 2 * MiB
    sc.set_kept_cache_limit(2 * MiB)  # a lower bound releases blocks down to it at once
    assert sc.kept_cache_bytes() <= 2 * MiB
    _dense_step(512, 128, 8)
    assert sc.kept_cache_bytes() <= 2 * MiB
    sc.set_kept_cache_limit(0)
    assert sc.kept_cache_bytes() == 0
    out = _dense_step(256, 128, 8)
    assert sc.kept_cache_bytes() == 0  # off: every block went back
    sc.set_kept_cache_limit(DEFAULT_LIMIT)
    torch.testing.assert_close(_dense_step(256, 128, 8), out, rtol=0, atol=0)  # same bits either way


def test_newest_shapes_evict_the_oldest(limit_restored):
    """A freed block that does not fit under the limit evicts the blocks freed longest ago:
    when two shapes alternate (two layers, or the interleaved benchmark), the shape that just
    ran finds its blocks, instead of the first shape's blocks holding the cache for good."""
    sc.set_kept_cache_limit(DEFAULT_LIMIT)
    held = {}
    for shape in ((256, 128, 8), (512, 128, 8)):
        sc.empty_kept_cache()
        _dense_step(*shape)
        held[shape] = sc.kept_cache_bytes()
        assert held[shape] > 2 * MiB
    a, b = held
    sc.set_kept_cache_limit(max(held.values()) + MiB // 2)  # either shape's blocks (each >= 1 MiB), not both
    assert held[a] + held[b] > sc.kept_cache_limit()
    for shape in (a, b, a, b):
        _dense_step(*shape)
        assert sc.kept_cache_bytes() <= sc.kept_cache_limit()
    sc.empty_kept_cache()
    _dense_step(*a)
    _dense_step(*b)
    assert sc.kept_cache_bytes() == held[b]  # b's blocks, which evicted a's


@pytest.mark.parametrize("value, error", [(-1, ValueError), (1.5, TypeError), ("1", TypeError),
                                          (True, TypeError)])
def test_set_limit_rejects(value, error):
    with pytest.raises(error, match="nbytes"):
        sc.set_kept_cache_limit(value)


def _env():
    """This process's environment without SPLINET_KEPT_CACHE_MB, with the splinet_cuda imported
    here first on the path (the checkout's, or the sanitizer build's copy)."""
    env = dict(os.environ)
    env.pop("SPLINET_KEPT_CACHE_MB", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(sc.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _run(code, env_value):
    env = _env()
    if env_value is not None:
        env["SPLINET_KEPT_CACHE_MB"] = env_value
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@needs_cpu_ops
@pytest.mark.parametrize("env_value, limit", [(None, DEFAULT_LIMIT), ("3", 3 * MiB), ("0", 0)])
def test_environment_variable(env_value, limit):
    code = ("import torch, splinet_cuda as sc\n"
            "x = torch.randn(256, 128); w = (0.1 * torch.randn(4, 128, 128)).requires_grad_()\n"
            "sc.spline_ode(x, w, None, 1.0, steps=8, degree=3, backend='cpu').sum().backward()\n"
            "print(sc.kept_cache_limit(), sc.kept_cache_bytes())\n")
    limit_seen, held = map(int, _run(code, env_value).split())
    assert limit_seen == limit
    assert held == (_kept_bytes(256, 128, 8) if limit else 0)  # 2.1 MiB: under 3 MiB too


@needs_cpu_ops
def test_environment_variable_invalid():
    code = ("import splinet_cuda as sc\nfrom splinet_cuda import _info\n"
            "print('kept-tensor cache: SPLINET_KEPT_CACHE_MB must be' in _info.info_text())\n"
            "try:\n    sc.kept_cache_bytes()\nexcept ValueError as e:\n    print('ValueError', e)\n")
    out = _run(code, "64MB")
    assert out.startswith("True\nValueError SPLINET_KEPT_CACHE_MB must be a whole number of MiB"), out


RSS_CALLS = int(os.environ.get("RSS_CALLS", 500))


def rss_probe():
    """500 forward + backward calls of the dense (float32 and float64, kept blocks of up to
    4.7 MiB), conv (1-3 spatial dims) and Hamiltonian layers on the cpu backend with shapes
    drawn anew each call; prints the resident set at the start, after the first 100 calls,
    at the end, and after empty_kept_cache(), as JSON."""
    import random

    try:  # glibc: returns the free memory of its arenas to the OS
        import ctypes

        malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        malloc_trim = None

    def rss(trim=False):
        gc.collect()
        if trim and malloc_trim is not None:
            malloc_trim(0)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    rng = random.Random(0)
    torch.manual_seed(0)
    torch.set_num_threads(2)

    def call(i):
        kind = ("dense", "dense", "conv", "hamiltonian")[i % 4]
        dtype = (torch.float32, torch.float64)[(i // 4) % 2]
        if kind == "dense":
            B, m, N = rng.choice((128, 256, 384)), rng.choice((64, 96, 128, 160)), rng.randint(4, 10)
            x = torch.randn(B, m, dtype=dtype)
            w = (0.1 * torch.randn(4, m, m, dtype=dtype)).requires_grad_()
            out = sc.spline_ode(x, w, None, 1.0, steps=N, degree=3, backend="cpu",
                                checkpoint=None if i % 8 else 3)
        elif kind == "conv":
            dims = rng.randint(1, 3)
            C = rng.choice((4, 8, 16, 40))
            spatial = (rng.choice((6, 8, 12)),) * dims
            x = torch.randn(rng.randint(1, 4), C, *spatial, dtype=dtype)
            w = (0.1 * torch.randn(3, C, C, *(3,) * dims, dtype=dtype)).requires_grad_()
            out = sc.spline_ode_conv(x, w, None, 1.0, steps=rng.randint(2, 6), degree=2, backend="cpu")
        else:
            B, m = rng.choice((64, 256)), rng.choice((16, 64))
            y, z = torch.randn(B, m, dtype=dtype), torch.randn(B, m, dtype=dtype)
            w = (0.1 * torch.randn(4, 2, m, m, dtype=dtype)).requires_grad_()
            out = sum(sc.spline_ode_hamiltonian(y, z, w, None, 1.0, steps=rng.randint(4, 12), degree=3,
                                                backend="cpu"))
        out.sum().backward()

    for i in range(8):  # each kind and dtype once at a small size: libraries loaded, threads started
        call(i)
    start, start_trimmed = rss(), rss(trim=True)
    after = {}
    for i in range(RSS_CALLS):
        call(i)
        if (i + 1) % 100 == 0:
            after[i + 1] = rss()
    end_trimmed = rss(trim=True)
    held = sc.kept_cache_bytes()
    sc.empty_kept_cache()
    print(json.dumps(dict(start=start, after_100=after[100], end=after[RSS_CALLS], held=held,
                          limit=sc.kept_cache_limit(), emptied=rss(), trimmed=malloc_trim is not None,
                          start_trimmed=start_trimmed, end_trimmed=end_trimmed,
                          every_100_mib=[round((v - start) / MiB, 1) for v in after.values()])))


@needs_cpu_ops
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc/self/statm (Linux)")
@pytest.mark.skipif(os.environ.get("LD_PRELOAD", "").find("asan") >= 0,
                    reason="ASan's allocator keeps freed memory in quarantine: the resident set is not ours")
def test_resident_set_within_the_bound():
    proc = subprocess.run([sys.executable, __file__], env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["limit"] == DEFAULT_LIMIT and r["held"] <= r["limit"]
    assert r["end"] - r["start"] <= r["limit"] + RSS_SLACK, r
    assert r["end"] - r["after_100"] <= RSS_SLACK, r  # no drift over the last 400 calls
    # emptying gave the blocks back to the OS (emptied is measured after the trim, if any)
    assert (r["end_trimmed"] if r["trimmed"] else r["end"]) - r["emptied"] >= 0.9 * r["held"], r
    if r["trimmed"]:  # glibc's free heap returned: what the process holds, the cache included
        assert r["end_trimmed"] - r["start_trimmed"] <= r["limit"] + TRIMMED_SLACK, r


if __name__ == "__main__":
    rss_probe()
