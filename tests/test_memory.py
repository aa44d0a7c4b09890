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
bound = MemoryBound(minimum=64 << 20)
checks = []
for _ in range(3):  # a steady working set: allocated and freed again, the heap holds it
    work = np.ones(1 << 26, np.float32)  # 256 MiB
    del work
    checks.append(bound.check())
blocks = [np.ones(1 << 24, np.float32) for _ in range(4)]  # 4 x 64 MiB, then freed: a hole
keep = np.ones(1 << 10, np.float32)  # allocated after them: the freed blocks are not the top
del blocks
checks.append(bound.check())  # free memory, no growth: kept
big = np.ones(3 << 24, np.float32)  # 192 MiB fits the 256 MiB hole: no growth
checks.append(bound.check())
del big
bigger = np.ones(5 << 24, np.float32)  # 320 MiB fits no free block: the heap grows
checks.append(bound.check())
for _ in range(2):  # the trimmed heap refilled to the size it had: not growth
    del bigger
    bigger = np.ones(5 << 24, np.float32)
    checks.append(bound.check())
print(" ".join(map(str, checks)), bound.trims)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")
def test_retained_memory_is_bounded():
    """A heap that holds its working set steady is never trimmed; one that grows although it
    holds free memory (a fragmented heap, which would grow without bound) is trimmed once, and
    refilling what the trim returned does not trim again."""
    applied, *checks, trims = run_python(BOUND).stdout.split()
    assert applied == "True"
    assert checks == ["False"] * 5 + ["True", "False", "False"] and trims == "1"


def test_cpu_process_retains_memory_within_a_bound():
    """configure_host, in a CPU process, retains freed memory and starts the bound's thread."""
    out = run_python("""
        import threading
        from lm import kernels
        kernels.configure_host()
        print(any(t.name == "lm-memory-bound" for t in threading.enumerate()))
    """)
    assert out.stdout.split()[-1] == ("True" if platform.libc_ver()[0] == "glibc" else "False")


def test_bench_tunes_the_host_before_the_backend_starts():
    """lm.bench sets the malloc retention before anything (its validation counts devices)
    starts the backend: afterwards the runtime's threads hold arenas it would not reach."""
    out = run_python("""
        import jax._src.xla_bridge as xb
        from lm import bench, kernels
        configure = kernels.configure_host
        def checked():
            print("backend up at configure_host:", xb.backends_are_initialized())
            configure()
        kernels.configure_host = checked
        bench.main(["--shape", "32,2,2,32,2", "--steps", "1", "--warmup", "0"])
    """)
    assert "backend up at configure_host: False" in out.stdout
