"""Build sparse_ops and its compiled extension sparse_ops._C.

Switches (environment variables), in the style of xformers / flash-attention:
  SPARSE_OPS_NO_EXT=1     pure-Python install; every op runs the reference (with a warning)
  FORCE_CUDA=1            build the CUDA sources even when torch.cuda.is_available() is False
                          (needs a CUDA build of torch and nvcc)
  TORCH_CUDA_ARCH_LIST    CUDA architectures, e.g. "8.0;9.0" (torch's own variable)
  MAX_JOBS                parallel compile jobs for ninja (torch's own variable)
  SPARSE_OPS_DEBUG=1      -O0 -g instead of -O3

The C++ CPU extension is always built. The CUDA sources are added when torch was
built with CUDA and either a GPU is visible or FORCE_CUDA=1.

The extension compiles against the torch that is installed, so install torch (>= 2.11) first and
build without pip's build isolation, as flash-attention does:
  pip install --no-build-isolation .        (or: pip install -e . --no-build-isolation)
A plain `pip install .` builds in an isolated environment without torch; this file then stops
with a message saying so (pyproject.toml names only setuptools and wheel as build requirements).
"""
import glob
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
NO_EXT = os.environ.get("SPARSE_OPS_NO_EXT", "0") == "1"
VERSION = "0.1.0"
TORCH_MIN = (2, 11)

HOW_TO_INSTALL = """\
  Install torch >= 2.11 first (or keep the one you have), then build against it without pip's
  build isolation, which hides the installed torch from the build:
      pip install "torch>=2.11"              # skip if torch >= 2.11 is installed
      pip install setuptools wheel ninja     # the build's own requirements (ninja: parallel compile)
      pip install --no-build-isolation .     # or: pip install -e . --no-build-isolation
  (SPARSE_OPS_NO_EXT=1 pip install . installs the pure-Python package without the extension.)"""


def _import_torch():
    """torch, or exit with what to do instead of a bare ModuleNotFoundError."""
    try:
        import torch
    except ImportError as e:
        isolated = any("pip-build-env" in p for p in sys.path)
        sys.exit("\nsparse_ops: building the extension sparse_ops._C needs PyTorch, and `import torch` "
                 f"failed ({e}).\n" +
                 ("  This looks like pip's build isolation (a temporary environment without your "
                  "torch).\n" if isolated else "") + HOW_TO_INSTALL + "\n")
    version = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
    if version < TORCH_MIN:
        sys.exit(f"\nsparse_ops: needs torch >= 2.11 to build; found torch {torch.__version__}.\n" +
                 HOW_TO_INSTALL + "\n")
    return torch


def _check_wheel_builder():
    """setuptools < 70.1 builds wheels (also editable ones) through the `wheel` package; without it
    pip --no-build-isolation stops at "invalid command 'bdist_wheel'"."""
    if not {"bdist_wheel", "editable_wheel"} & set(sys.argv):
        return
    try:
        import setuptools.command.bdist_wheel  # noqa: F401  (setuptools >= 70.1)
    except ImportError:
        try:
            import wheel  # noqa: F401
        except ImportError:
            sys.exit("\nsparse_ops: building a wheel with this setuptools needs the `wheel` package, "
                     "which is not installed.\n" + HOW_TO_INSTALL + "\n")


def _write_build_info(info):
    path = os.path.join(ROOT, "sparse_ops", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py: what this build contains and why.\n")
        f.write(f"BUILD = {info!r}\n")


def _extensions():
    if NO_EXT:
        _write_build_info({"ext": False, "cuda": False,
                           "why": "SPARSE_OPS_NO_EXT=1 at build time"})
        return [], {}
    torch = _import_torch()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("SPARSE_OPS_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # SPARSE_OPS_SANITIZE=1: AddressSanitizer + UndefinedBehaviorSanitizer, every UB report fatal
    # (.ci/sanitize.sh builds this way and runs the tests under it).
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"] \
        if os.environ.get("SPARSE_OPS_SANITIZE", "0") == "1" else []
    if sanitize:
        opt = ["-O1", "-g"] + sanitize
    # No -std and no Py_LIMITED_API here: torch's BuildExtension adds the standard its headers
    # need (C++17 for torch 2.13, C++20 for 2.14) and the limited-API define (py_limited_api).
    # -fno-math-errno -fno-trapping-math (as torch itself builds): lets GCC if-convert and
    # vectorise loops with float compares and selects (the softmax exp in heads_cpu.cpp stayed
    # scalar without them); NaN and inf results are unchanged.
    cxx_flags = opt + ["-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    link_flags = ["-fopenmp"] + sanitize

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) +
                     glob.glob(os.path.join("csrc", "cpu", "*.cpp")))

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    torch_has_cuda = torch.version.cuda is not None
    use_cuda = torch_has_cuda and CUDA_HOME is not None and (force_cuda or torch.cuda.is_available())
    if use_cuda:
        why_cuda = "built (FORCE_CUDA=1)" if force_cuda else "built (a GPU was visible)"
    elif not torch_has_cuda:
        why_cuda = f"not built: torch {torch.__version__} is a CPU-only build"
    elif CUDA_HOME is None:
        why_cuda = "not built: no CUDA toolkit found (CUDA_HOME / nvcc)"
    else:
        why_cuda = "not built: no GPU visible and FORCE_CUDA is not 1"

    if use_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")) +
                          glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        ext = CUDAExtension(
            "sparse_ops._C", sources,
            extra_compile_args={"cxx": cxx_flags + ["-DSPARSE_OPS_WITH_CUDA"],
                                "nvcc": (["-O3", "-lineinfo"] if not debug else ["-O0", "-G"]) +
                                        ["-DSPARSE_OPS_WITH_CUDA"]},
            extra_link_args=link_flags, py_limited_api=True)
    else:
        ext = CppExtension("sparse_ops._C", sources,
                           extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=link_flags, py_limited_api=True)
    _write_build_info({"ext": True, "cuda": use_cuda, "why_cuda": why_cuda,
                       "torch": torch.__version__,
                       "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", "")})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


_check_wheel_builder()
ext_modules, cmdclass = _extensions()

setup(
    name="sparse_ops",
    version=VERSION,
    description="Dynamic sparse execution for transformers: skipped heads, FFN columns and layers "
                "are never computed, with autograd and straight-through gates.",
    # The library only: bench/ (python -m bench, run from the repo root) and tests/ stay out of
    # the wheel; a top-level `bench` package would clash with anything else of that name.
    packages=find_packages(include=["sparse_ops", "sparse_ops.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
