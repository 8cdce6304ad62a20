"""The runner's attention on CPU, in C (cpu_attention.c), built on first use with the machine's C
compiler and loaded through ctypes.

Why C: at a step's few rows the torch attention (specdec.runner's blocks, invariant by its fixed
blocks and running sums) is some thirty small operations a layer, and on this project's 2-core
machines their dispatch costs more than their arithmetic: about a quarter of a one-token step,
and a tree's nodes off its leading chain cost as much again (bench/RESULTS.md). The C kernel does
one call a layer, and a tree node reads its ancestors' slots where they are instead of a copy of
the cache laid out as their chain. Its numbers are invariant by construction: each query row's
output is computed from its own list of keys in a fixed order (see the .c file).

The library is cached under $SPECDEC_CACHE_DIR (default ~/.cache/specdec), named by a hash of the
source, the flags, the compiler and this CPU's flags (it is built with -march=native), so a
changed kernel or another machine builds its own. Without a C compiler the runner keeps its torch
attention (load() returns None, and says why in the log).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from specdec.models import default_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".c")
FLAGS = ("-O2", "-march=native", "-ffp-contract=fast", "-fPIC", "-shared")
# OpenMP: the kernel splits long calls among the threads of the OpenMP team torch already runs
# (torch's wheels ship libgomp.so.1, which the kernel's libgomp.so.1 resolves to once torch is
# loaded). A compiler without OpenMP builds the kernel single-threaded.
OPENMP = ("-fopenmp",)


class CpuAttention:
    """specdec_attend, loaded: attention of query rows over one layer's cache, each row over its
    own key slots (KeyLists)."""

    def __init__(self, library: ctypes.CDLL, threads: int = 0):
        self.threads = threads  # the most threads a call may use; 0: torch's thread count
        self.openmp = bool(library.specdec_openmp())  # False: built without OpenMP, every call on one thread
        self._attend = library.specdec_attend
        self._attend.restype = ctypes.c_int
        pointer, integer = ctypes.c_void_p, ctypes.c_int
        self._attend.argtypes = [pointer, pointer, pointer, integer, pointer, pointer, pointer, integer, integer,
                                 integer, integer, integer, ctypes.c_float, pointer, integer]

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lists: "KeyLists",
               scale: float) -> torch.Tensor:
        """q [rows, heads, dim] over keys and values [kv_heads, capacity, dim] (float32, CPU):
        [rows, heads, dim]."""
        if not (keys.is_contiguous() and values.is_contiguous()):
            raise ValueError("the CPU attention kernel reads contiguous keys and values")
        q = q.contiguous()
        rows, heads, dim = q.shape
        out = torch.empty_like(q)
        status = self._attend(q.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.shape[1],
                              lists.prefix.data_ptr(), lists.extra.data_ptr(), lists.n_extra.data_ptr(),
                              lists.extra.shape[1], rows, heads, keys.shape[0], dim, scale, out.data_ptr(),
                              self.threads or torch.get_num_threads())
        if status:
            raise MemoryError("the CPU attention kernel could not allocate its buffers")
        return out


class KeyLists:
    """Which cache slots each query row attends to, in order: slots [0, prefix[r]), then
    extra[r, :n_extra[r]] (int32 tensors, built once a pass and read by every layer)."""

    def __init__(self, prefix: list[int], extra: list[list[int]]):
        width = max((len(e) for e in extra), default=0)
        self.prefix = torch.tensor(prefix, dtype=torch.int32)
        self.n_extra = torch.tensor([len(e) for e in extra], dtype=torch.int32)
        self.extra = torch.tensor([e + [0] * (width - len(e)) for e in extra], dtype=torch.int32).reshape(
            len(prefix), width)


def usable(dtype: torch.dtype, device: torch.device, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel handles such a model: float32 on CPU, head_dim a multiple of 8."""
    return device.type == "cpu" and dtype == torch.float32 and head_dim % 8 == 0 and heads % kv_heads == 0


def load() -> CpuAttention | None:
    """The kernel, built if this machine has no copy yet; None without a working C compiler."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        log.warning("no C compiler (cc, gcc or $CC): the runner keeps its torch attention")
        return None
    try:
        return CpuAttention(ctypes.CDLL(str(_library(compiler))))
    except subprocess.CalledProcessError as error:
        log.warning("the CPU attention kernel did not build (%s: %s): the runner keeps its torch attention",
                    compiler, error.stderr.strip()[-2000:])
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("the CPU attention kernel did not build or load (%s): the runner keeps its torch attention",
                    error)
    return None


def _library(compiler: str) -> Path:
    """The kernel's library for this machine, built if missing: with OpenMP, or without it where
    that build failed before (its library then exists, so a compiler without OpenMP is not asked
    again at every start)."""
    machine = _compiler_version(compiler) + platform.machine() + _cpu_flags()
    with_openmp, alone = (default_cache_dir() / f"cpu_attention-{_build_key(compiler, flags, machine)}.so"
                          for flags in (FLAGS + OPENMP, FLAGS))
    for library in (with_openmp, alone):
        if library.exists():
            return library
    try:
        _build(compiler, FLAGS + OPENMP, with_openmp)
        return with_openmp
    except subprocess.CalledProcessError:
        log.warning("%s cannot build with OpenMP: the CPU attention kernel runs on one thread", compiler)
    _build(compiler, FLAGS, alone)
    return alone


def _build_key(compiler: str, flags: tuple[str, ...], machine: str) -> str:
    """A library's name: a hash of the source, the command, the compiler's version and the CPU."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join((compiler,) + flags).encode())
    digest.update(machine.encode())
    return digest.hexdigest()[:16]


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, flags: tuple[str, ...], library: Path) -> None:
    """Compiles into a temporary file renamed into place, so that processes building at once
    (services starting together) never load a half-written library."""
    library.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=library.parent, suffix=".so.partial")
    os.close(handle)
    try:
        subprocess.run([compiler, *flags, str(SOURCE), "-o", partial, "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
