"""Finds or builds the chargpt C++/CUDA extension (csrc/) and loads its ops into torch.ops.chargpt.

Order of preference, decided once per process on first use (never at `import chargpt_kernels`):
1. `kernels/chargpt_kernels/_C*.so` built by `pip install` (setup.py), if it was built for this very torch, the same
   CHARGPT_EXT_MARCH and the same kind of CPU (its build stamp says so) and has the CUDA part whenever this process
   can use CUDA;
2. a just-in-time build with torch.utils.cpp_extension.load (ninja), cached under
   ~/.cache/chargpt/ext/torch-<version>-<cpu|cuda>-<march>-<cpu key> (or under $CHARGPT_EXT_DIR), so it always
   matches the running torch, and a home directory shared between machines never loads a build for another CPU.
   The C++ part is always built; the .cu files only when CUDA is usable at run time and nvcc is found.
The C++ kernels are built for -march=$CHARGPT_EXT_MARCH (default native; e.g. x86-64-v2, x86-64-v3 for a binary that
runs on any AVX2 machine). Set CHARGPT_EXT=0 to switch the backend off.
"""

import functools
import glob
import hashlib
import os
import platform
import re
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

from chargpt_kernels.runtime import BackendUnavailable

PACKAGE = Path(__file__).resolve().parent  # kernels/chargpt_kernels
CSRC = PACKAGE.parent.parent / "csrc"


def target_march():
    """The -march the C++ kernels are built for: $CHARGPT_EXT_MARCH, else native."""
    return os.environ.get("CHARGPT_EXT_MARCH", "").strip() or "native"


def _check_march(march):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", march):
        raise ValueError(f"CHARGPT_EXT_MARCH={march!r} is not a -march value (e.g. native, x86-64-v2, x86-64-v3)")


@functools.cache
def cpu_key():
    """A short hash of this CPU's identity and feature flags (the first processor of /proc/cpuinfo, else what
    platform knows): builds, -march=native ones above all, are only ever reused on the same kind of CPU."""
    wanted = ("vendor_id", "cpu family", "model", "model name", "flags", "CPU implementer", "CPU part", "Features")
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in wanted and key not in fields:
                fields[key] = " ".join(sorted(value.split())) if key in ("flags", "Features") else value.strip()
    except OSError:
        pass
    identity = repr(sorted(fields.items())) if fields else f"{platform.machine()} {platform.processor()}"
    return hashlib.sha256(identity.encode()).hexdigest()[:10]


# No FMA contraction: LayerNorm's dx = g*w - mean(g*w) - ... must cancel exactly when N = 1. The C++ standard is left
# to torch (C++17 or C++20 by version).
CXX_FLAGS = ["-O3", f"-march={target_march()}", "-ffp-contract=off", "-fopenmp"]
NVCC_FLAGS = ["-O3", "-lineinfo"]
HEADER_SUFFIXES = (".h", ".cuh")
OPS = ("layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd", "add_norm_fwd", "add_norm_bwd",
       "attention_fwd", "attention_bwd", "linear_fwd")

_lock = threading.Lock()
_state = {"done": False, "reason": None}


def cpp_sources():
    return [str(CSRC / "ops.cpp")] + sorted(glob.glob(str(CSRC / "cpu" / "*.cpp")))


def cuda_sources():
    return sorted(glob.glob(str(CSRC / "cuda" / "*.cu")))


def find_cuda_home():
    """The CUDA toolkit root: $CUDA_HOME, else nvcc's install (its folder may be a symlink farm like
    /usr/local/bin, so the real path is followed, then /usr/local/cuda is tried). None without nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").exists() and (
                glob.glob(f"{home}/lib64/libcudart*") or glob.glob(f"{home}/lib/libcudart*")
                or glob.glob(f"{home}/targets/*/lib/libcudart*")):
            return home
    return None


def _use_cuda_home(home):
    os.environ["CUDA_HOME"] = home
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.CUDA_HOME = home  # it guessed at import time, before we could say


def _stamp(with_cuda):
    return (f"chargpt-build:torch={torch.__version__};cuda={int(with_cuda)};march={target_march()};"
            f"cpu={cpu_key()};").encode()


def _prebuilt(want_cuda):
    """Path of a setup.py-built library made for this torch (and with CUDA when wanted), else None."""
    for path in sorted(glob.glob(str(PACKAGE / "_C*.so"))):
        data = Path(path).read_bytes()
        if _stamp(True) in data or (not want_cuda and _stamp(False) in data):
            return path
    return None


def _jit_build(with_cuda):
    import torch.utils.cpp_extension as cpp_extension

    variant = "cuda" if with_cuda else "cpu"
    march = target_march()
    _check_march(march)
    base = os.environ.get("CHARGPT_EXT_DIR") or os.path.join(Path.home(), ".cache", "chargpt", "ext")
    build_dir = os.path.join(base, f"torch-{torch.__version__}-{variant}-{march}-{cpu_key()}")
    os.makedirs(build_dir, exist_ok=True)
    sources = cpp_sources() + (cuda_sources() if with_cuda else [])
    built = glob.glob(os.path.join(build_dir, f"chargpt_ext_{variant}*.so"))
    # Only for the notice: ninja itself tracks every included header (.h and .cuh) through the compilers' depfiles.
    headers = [p for p in glob.glob(str(CSRC / "**" / "*"), recursive=True) if p.endswith(HEADER_SUFFIXES)]
    newest_source = max(os.path.getmtime(p) for p in sources + headers)
    if not built or max(os.path.getmtime(p) for p in built) < newest_source:  # else ninja has nothing to do
        print(f"chargpt_kernels: compiling the chargpt {'C++/CUDA' if with_cuda else 'C++'} extension "
              f"for -march={march} (first use, cached in {build_dir})", file=sys.stderr, flush=True)
    cxx_flags = [f"-march={march}" if flag.startswith("-march=") else flag for flag in CXX_FLAGS]
    cpp_extension.load(
        name=f"chargpt_ext_{variant}", sources=sources, extra_cflags=cxx_flags, extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=NVCC_FLAGS, extra_include_paths=[str(CSRC)], build_directory=build_dir,
        is_python_module=False, verbose=False)


def _load():
    if os.environ.get("CHARGPT_EXT", "1") == "0":
        return "it is switched off by CHARGPT_EXT=0"
    want_cuda = torch.cuda.is_available() and torch.version.cuda is not None
    cuda_home = find_cuda_home() if torch.version.cuda is not None else None
    if cuda_home:  # also silences torch's wrong guess for a CPU-only build
        _use_cuda_home(cuda_home)
    cuda_home = cuda_home if want_cuda else None
    prebuilt = _prebuilt(want_cuda and cuda_home is not None)
    try:
        if prebuilt:
            torch.ops.load_library(prebuilt)
        elif cuda_home:
            try:
                _jit_build(with_cuda=True)
            except Exception as error:  # keep the CPU path: build the C++ part alone
                warnings.warn(f"chargpt_kernels: the CUDA part of the chargpt extension failed to build "
                              f"({_first_line(error)}); building the C++ part only", stacklevel=2)
                _jit_build(with_cuda=False)
        else:
            _jit_build(with_cuda=False)
    except Exception as error:
        return f"the C++ extension could not be built or loaded ({_first_line(error)})"
    missing = [op for op in OPS if not hasattr(torch.ops.chargpt, op)]
    if missing:
        return f"the loaded extension lacks the ops {', '.join(missing)}"
    return None


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def unavailable_reason():
    """None when the extension is loaded (building it on first call if needed), else one sentence why not."""
    if _state["done"]:  # lock-free once decided, which also keeps torch.compile tracing through this
        return _state["reason"]
    with _lock:
        if not _state["done"]:
            _state["reason"] = _load()
            _state["done"] = True
    return _state["reason"]


def has_cuda_kernels():
    """Whether the loaded extension registered CUDA kernels (the .cu part was built)."""
    return unavailable_reason() is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "chargpt::attention_fwd", "CUDA")


def require():
    """Load the extension or raise chargpt_kernels.BackendUnavailable saying why."""
    reason = unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(f"chargpt_kernels backend 'ext' is unavailable: {reason}")
