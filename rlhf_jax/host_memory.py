"""CPU runs: keep freed host memory for the next call instead of unmapping it.

XLA's CPU runtime allocates the temporaries of each call as one block, from one of
its worker threads: about 1.4 GB for one PPO update of the GPT-2-shaped benchmark
model (benchmarks/ppo.py), 150 MB for its scoring. glibc serves a block that large
with a fresh `mmap` and unmaps it when it is freed, so every call page-faults the
whole block in again: some 400,000 faults and about a second of kernel time per PPO
iteration on a 2-core machine, and up to four times that when another process has
just used the memory (measured in benchmarks/compare.py runs, where TRL's process
runs between rlhf_jax's iterations).

`keep_freed_memory()` tells glibc to serve every thread from one heap that never
shrinks: one arena (M_ARENA_MAX), no mmap'd chunks (M_MMAP_MAX), no trimming
(M_TRIM_THRESHOLD). The block then stays mapped and the next call reuses it without a
fault. The price is that the process keeps its peak heap until it exits, and all
threads share one arena lock. Training steps come out ahead: on a 2-core CPU the
reward-model step of benchmarks/train_step.py took 0.67 s with it against
0.76-0.79 s without, and a PPO iteration of benchmarks/ppo.py 4.4 s against 4.6 s.
Sampling alone loses: its decode loop allocates and frees a few hundred blocks (up to
512 KB) per token from the runtime's threads, which then queue on the one lock, and
benchmarks/sampler.py ran 6-13% slower with it on one XLA device and 8-26% slower on
two. So the trainer applies it, and a process that only samples is better without.

It must run before any thread first calls malloc -- glibc fixes the number of arenas
the first time a second thread allocates -- so the entry point calls it before it
imports jax, numpy or absl. Only CPU runs need it (an accelerator's buffers are not
host memory), so by default it applies only on a host with no accelerator plugin;
`RLHF_JAX_KEEP_FREED_MEMORY=1` forces it, `=0` turns it off. In a notebook, call
`rlhf_jax.host_memory.keep_freed_memory()` in the first cell, before importing jax.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import pkgutil

# mallopt parameter numbers (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # the largest value mallopt's int accepts, in bytes

ENV_VAR = "RLHF_JAX_KEEP_FREED_MEMORY"


def accelerator_plugin_installed() -> bool:
  """Whether jax could find a TPU or GPU here (libtpu or a PJRT plugin package)."""
  if importlib.util.find_spec("libtpu") is not None:
    return True
  names = [m.name for m in pkgutil.iter_modules()]
  if any(n.startswith(("jax_cuda", "jax_rocm")) for n in names):
    return True
  plugins = importlib.util.find_spec("jax_plugins")
  return plugins is not None and any(
      True for _ in pkgutil.iter_modules(plugins.submodule_search_locations or []))


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory (see the module docstring).

  Returns whether the settings took effect: False off glibc (macOS, musl), where
  nothing changes.
  """
  libc_name = ctypes.util.find_library("c")
  if libc_name is None:
    return False
  libc = ctypes.CDLL(libc_name)
  if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)


def configure_for_this_host() -> bool:
  """`keep_freed_memory()` on CPU-only hosts, or as RLHF_JAX_KEEP_FREED_MEMORY says.

  Returns whether it was applied.
  """
  choice = os.environ.get(ENV_VAR, "auto").strip().lower()
  if choice in ("0", "false", "no", "off"):
    return False
  if choice in ("", "auto") and accelerator_plugin_installed():
    return False
  return keep_freed_memory()
