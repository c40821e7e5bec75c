"""The CUDA kernels compile for the GPUs we target, without a GPU: each .cu file goes through nvcc once for sm_80
and sm_90 together (files in parallel), with -Xptxas -v; a host-only file (no __global__) just has to compile.
Registers and spills are printed per kernel (pytest -s); any compile error or a spill over MAX_SPILL_BYTES in a
shipped kernel fails. Skipped without nvcc or with a CPU-only torch."""

import inspect
import os
import re
import subprocess
import sysconfig
import time

import pytest
import torch

from chargpt_kernels import ext_build

ARCHS = ("80", "90")
MAX_SPILL_BYTES = 0  # every kernel fits its registers (the launch bounds in the .cu files say how)


def _nvcc_command(cuda_home, source, obj):
    from torch.utils import cpp_extension

    std = "-std=c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "-std=c++17"  # what torch builds with
    includes = cpp_extension.include_paths() + [os.path.join(cuda_home, "include"), sysconfig.get_paths()["include"],
                                                str(ext_build.CSRC)]
    arch_flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    return ([os.path.join(cuda_home, "bin", "nvcc"), "-c", source, "-o", obj, std, "-Xptxas", "-v",
             "-Xcompiler", "-fPIC", *ext_build.NVCC_FLAGS, *cpp_extension.COMMON_NVCC_FLAGS, *arch_flags]
            + [f"-I{p}" for p in includes])


def _kernel_stats(log):
    """(kernel, arch, registers, spill stores, spill loads) for every entry function in a -Xptxas -v log."""
    stats, current = [], None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line):
            current = [m.group(1), m.group(2), 0, 0, 0]
        elif current and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current[3], current[4] = int(m.group(1)), int(m.group(2))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            current[2] = int(m.group(1))
            stats.append(tuple(current))
            current = None
    return stats


def _short(mangled):
    """attention_fwd_kernel<half, 2> for the mangled name of that template instance (or a prefix if unknown)."""
    m = re.search(r"([a-z_]+_kernel)I(.*?)EEv", mangled)
    if not m:
        return mangled[:60]
    types = {"f": "float", "N3c104HalfE": "half", "N3c108BFloat16E": "bf16"}
    names = re.findall(r"N3c104HalfE|N3c108BFloat16E|f|Li\d+", m.group(2))
    return f"{m.group(1)}<{', '.join(types.get(n, n[2:]) for n in names)}>"


def test_cuda_sources_compile_for_sm80_and_sm90_without_spills(tmp_path):
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build")
    cuda_home = ext_build.find_cuda_home()
    if cuda_home is None:
        pytest.skip("nvcc not found")
    start = time.perf_counter()
    jobs = {}
    for source in ext_build.cuda_sources():
        cmd = _nvcc_command(cuda_home, source, str(tmp_path / (os.path.basename(source) + ".o")))
        jobs[source] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failures = []
    for source, job in jobs.items():
        log, _ = job.communicate()
        name = os.path.basename(source)
        if job.returncode != 0:
            errors = [line for line in log.splitlines() if "error" in line][:10]
            failures.append(f"{name}: nvcc exit {job.returncode}\n" + "\n".join(errors or log.splitlines()[-10:]))
            continue
        stats = _kernel_stats(log)
        if "__global__" not in open(source).read():
            continue  # host code only (launch and dispatch): it compiles, and has no kernel to report
        assert stats, f"{name}: no kernels reported by ptxas"
        print(f"\n{name}: kernel (sm) registers spill-stores spill-loads")
        for kernel, arch, regs, stores, loads in stats:
            print(f"  {_short(kernel):60s} sm_{arch} {regs:4d} {stores:4d} {loads:4d}")
            if max(stores, loads) > MAX_SPILL_BYTES:
                failures.append(f"{name}: {_short(kernel)} on sm_{arch} spills ({stores} B stored, {loads} B loaded)")
    print(f"nvcc for sm_{' and sm_'.join(ARCHS)}: {time.perf_counter() - start:.0f} s")
    assert not failures, "\n".join(failures)
