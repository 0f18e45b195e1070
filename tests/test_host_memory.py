"""host_memory: a large block freed by one thread is reused without page faults."""
import os
import subprocess
import sys

import pytest

from rlhf_jax import host_memory

# Allocates, fills and frees 64 MB twice from worker threads (as XLA's CPU runtime
# allocates a call's temporaries) and prints the page faults of the second round.
_PROGRAM = """
import ctypes, ctypes.util, resource, threading
from rlhf_jax import host_memory
applied = host_memory.configure_for_this_host()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 64 << 20

def fill_and_free():  # plain malloc: numpy would ask for huge pages
  block = libc.malloc(SIZE)
  ctypes.memset(block, 1, SIZE)
  libc.free(block)

def in_thread():
  thread = threading.Thread(target=fill_and_free)
  thread.start()
  thread.join()

in_thread()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
in_thread()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_round_faults(setting: str) -> tuple[bool, int]:
  env = dict(os.environ, **{host_memory.ENV_VAR: setting})
  out = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True,
                       text=True, check=True).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_blocks_are_reused_without_page_faults():
  applied, faults = _second_round_faults("1")
  assert applied
  assert faults < 2000  # the thread's own stack and bookkeeping, not the block
  # Without the settings glibc unmaps the block, so each page (16,384 of 4 KiB)
  # faults in again.
  not_applied, default_faults = _second_round_faults("0")
  assert not not_applied
  assert default_faults > 10_000
