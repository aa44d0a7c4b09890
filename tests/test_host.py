import platform

import pytest

from tests.conftest import run_python

FAULTS = """
import resource
from lm.host import retain_freed_memory
print(retain_freed_memory())
import jax, jax.numpy as jnp
f = jax.jit(lambda a: a * 2.0)
a = jnp.ones(1 << 24)  # 64 MiB: above glibc's largest mmap threshold
f(a).block_until_ready()
faults = []
for _ in range(30):  # the heap grows a few times before it holds the working set
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")
@pytest.mark.parametrize("retain", [True, False])
def test_retained_memory_is_not_faulted_in_again(retain):
    """A fresh 64 MiB output is faulted in again on every call (16,384 pages, or 32 with
    transparent huge pages) unless freed memory stays mapped; with it, once the heap has grown
    to the working set (a few calls, as buffers are freed asynchronously), calls stop faulting."""
    out = run_python(FAULTS, env={"LM_RETAIN_FREED_MEMORY": "1" if retain else "0"})
    applied, faults = out.stdout.split()
    assert applied == str(retain)
    assert int(faults) < 16 if retain else int(faults) >= 32


BOUND = """
import numpy as np
from lm.host import RetainedMemoryBound, resident_bytes, retain_freed_memory
print(retain_freed_memory())
bound = RetainedMemoryBound()
bound.check()  # baseline
steady = bound.check()
big = np.ones(1 << 26, np.float32)  # 256 MiB from the heap
keep = np.ones(1 << 10, np.float32)  # allocated after it: the freed block is a hole, not the top
del big
held = resident_bytes()  # freed but retained
trimmed = bound.check()
print(steady, trimmed, (held - resident_bytes()) >> 20, bound.trims)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")
def test_retained_memory_is_bounded():
    """Freed memory stays resident until RSS passes twice the first check's; then it is
    handed back (a fragmented heap cannot grow the process without bound)."""
    applied, steady, trimmed, released_mib, trims = run_python(BOUND).stdout.split()
    assert applied == "True" and steady == "False" and trimmed == "True" and trims == "1"
    assert int(released_mib) >= 200
