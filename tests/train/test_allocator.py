"""keep_freed_memory: large blocks freed by one training step are reused by the next, not faulted in again."""

import subprocess
import sys

import pytest

from mellow.train.allocator import keep_freed_memory

FAULTS = """
import resource, sys, torch
from mellow.train.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(10):  # malloc's heap settles (it grows while aligned blocks and free ones fit together)
    torch.empty(10_000_000).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(10_000_000).fill_(1.0)  # a step's gradient-sized buffer: 9 766 pages
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> tuple[str, int]:
    output = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = output.split()
    return applied, int(faults)


@pytest.mark.slow  # two processes that each allocate and free 40 MB blocks many times
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_blocks_are_reused_without_page_faults():
    _, faults_default = page_faults("default")
    applied, faults_kept = page_faults("keep")
    assert applied == "True"
    pages = 10_000_000 * 4 // 4096
    assert faults_default > 10 * pages  # glibc maps and unmaps each 40 MB block: every use faults it in again
    assert faults_kept < pages // 10  # reused from malloc's free lists


def test_keep_freed_memory_is_idempotent():
    if not sys.platform.startswith("linux"):
        assert keep_freed_memory() is False
        return
    # in its own process: in this one it would change malloc for the rest of the test session
    both = subprocess.run([sys.executable, "-c", "from mellow.train.allocator import keep_freed_memory as keep\n"
                           "print(keep(), keep())"], capture_output=True, text=True, check=True).stdout.split()
    assert both == ["True", "True"]
