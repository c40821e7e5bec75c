"""Package metadata lives in pyproject.toml; this file adds the chargpt C++/CUDA extension (csrc/) when it can.

- torch importable here: build `chargpt_kernels._C` -- the C++ part always, the .cu files too when torch is a CUDA build
  and nvcc is found (or FORCE_CUDA=1). Without a visible GPU, TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0".
- torch not importable (pip's isolated build environment): install the pure-Python packages only; the extension
  is then built just-in-time on first use by kernels/chargpt_kernels/ext_build.py, against whatever torch runs.
"""

import importlib.util
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _ext_build_module():
    """kernels/chargpt_kernels/ext_build.py without importing the chargpt_kernels package (one source of truth for
    sources and flags)."""
    spec = importlib.util.spec_from_file_location("_chargpt_ext_build",
                                                  os.path.join(HERE, "kernels", "chargpt_kernels", "ext_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("setup.py: torch is not importable here, so the chargpt extension is not built now; it builds "
              "just-in-time on first use", file=sys.stderr)
        return [], {}
    eb = _ext_build_module()
    cuda_home = eb.find_cuda_home() if torch.version.cuda is not None else None
    with_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or cuda_home is not None
    if cuda_home:
        eb._use_cuda_home(cuda_home)  # torch guesses from nvcc's folder, wrong when that is /usr/local/bin
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    stamp = eb._stamp(with_cuda).decode()
    sources = [os.path.relpath(p, HERE) for p in eb.cpp_sources() + (eb.cuda_sources() if with_cuda else [])]
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    print(f"setup.py: building chargpt_kernels._C ({'C++ and CUDA' if with_cuda else 'C++ only'}) for torch "
          f"{torch.__version__}", file=sys.stderr)
    ext = kind(
        name="chargpt_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=[("CHARGPT_BUILD_STAMP", f'"{stamp}"')],
        extra_compile_args={"cxx": eb.CXX_FLAGS, "nvcc": eb.NVCC_FLAGS},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
