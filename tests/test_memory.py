import platform

import pytest

from tests.conftest import run_python

FAULTS = """
import resource
from lm.kernels.memory import retain_freed_memory
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
from lm.kernels.memory import MemoryBound, retain_freed_memory
print(retain_freed_memory())
bound = MemoryBound(factor=2.0, minimum=64 << 20)
work = np.ones(1 << 24, np.float32)  # 64 MiB in use
steady = bound.check()
del work
after_step = bound.check()  # one working set free: kept
blocks = [np.ones(1 << 24, np.float32) for _ in range(4)]  # 256 MiB, then freed: a hole
keep = np.ones(1 << 10, np.float32)  # allocated after them: the freed blocks are not the top
bound.peak_in_use = 64 << 20  # as if the process had only ever used 64 MiB
del blocks
trimmed = bound.check()
print(steady, after_step, trimmed, bound.trims)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")
def test_retained_memory_is_bounded():
    """Free memory up to a working set stays with the process; a heap holding more than twice
    the largest in-use size ever seen is trimmed (a fragmented heap cannot grow without bound)."""
    applied, steady, after_step, trimmed, trims = run_python(BOUND).stdout.split()
    assert applied == "True" and steady == "False" and after_step == "False"
    assert trimmed == "True" and trims == "1"


def test_cpu_process_retains_memory_within_a_bound():
    """configure_host, in a CPU process, retains freed memory and starts the bound's thread."""
    out = run_python("""
        import threading
        from lm import kernels
        kernels.configure_host()
        print(any(t.name == "lm-memory-bound" for t in threading.enumerate()))
    """)
    assert out.stdout.split()[-1] == ("True" if platform.libc_ver()[0] == "glibc" else "False")
