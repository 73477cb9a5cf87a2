"""The source distribution builds: it holds every source and every header the sources include
(it once missed the csrc/common/ and csrc/cpu/ headers and csrc/cuda/*, so installing it failed
with "activations.h: No such file or directory"), the Python packages, README and LICENSE, and
no tests that import what it does not ship."""
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sdist_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdist")
    env = {**os.environ, "FORCE_ONLY_CPU": "1"}
    res = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(out), "sdist", "-d", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (archive,) = out.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    root = names[0].split("/")[0]
    return {n[len(root) + 1:] for n in names if n.startswith(root + "/")}


def test_sdist_holds_every_source_and_included_header(sdist_files):
    sources = [p for p in REPO.glob("csrc/**/*") if p.suffix in (".cpp", ".cu", ".h", ".cuh")]
    assert sources
    for src in sources:
        rel = src.relative_to(REPO).as_posix()
        assert rel in sdist_files, f"{rel} missing from the sdist"
        for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', src.read_text(), re.M):
            target = os.path.normpath(os.path.join(os.path.dirname(rel), inc))
            if not os.path.exists(REPO / target):  # resolved through -Icsrc
                target = os.path.normpath(os.path.join("csrc", inc))
            assert target in sdist_files, f"{rel} includes {inc}, not in the sdist"


def test_sdist_leaves_out_the_test_only_emulation(sdist_files):
    """The CPU emulation of the CUDA programs is test code (tests/cpp/cuda_emulated.cpp, built
    only from a checkout with SPLINET_EMULATION=1): not shipped, while the drivers it includes
    through csrc/ are."""
    assert "tests/cpp/cuda_emulated.cpp" not in sdist_files
    src = (REPO / "tests" / "cpp" / "cuda_emulated.cpp").read_text()
    includes = re.findall(r'^\s*#\s*include\s+"([^"]+)"', src, re.M)
    assert includes
    for inc in includes:
        assert os.path.normpath(os.path.join("csrc", inc)) in sdist_files, f"{inc} not in the sdist"


def test_sdist_holds_packages_and_build_files(sdist_files):
    for f in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "CMakeLists.txt"):
        assert f in sdist_files
    for pkg in ("splinet_cuda", "triton_kernels"):
        for py in (REPO / pkg).glob("*.py"):
            assert py.relative_to(REPO).as_posix() in sdist_files
    # no tests (they import bench/ and examples/), no build products
    assert not [f for f in sdist_files if f.startswith(("tests/", "bench/", "examples/", "tools/", "build/"))]
    assert not [f for f in sdist_files if f.endswith((".so", ".o", ".pyc"))]


def test_wheel_layout_puts_the_triton_kernels_inside_the_package(tmp_path):
    """What a wheel installs (setup.py build_py): splinet_cuda/ with splinet_cuda/triton_kernels/
    inside it, and no top-level triton_kernels package (another project's name)."""
    env = {**os.environ, "FORCE_ONLY_CPU": "1"}
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    top = sorted(p.name for p in tmp_path.iterdir())
    assert top == ["splinet_cuda"], top
    kernels = {p.name for p in (tmp_path / "splinet_cuda" / "triton_kernels").glob("*.py")}
    assert kernels == {p.name for p in (REPO / "triton_kernels").glob("*.py")}
