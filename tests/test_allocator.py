"""The runtime's mmap threshold returns freed tensors to the OS; glibc's default heap keeps them resident."""

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from lars_ort.allocator import set_mmap_threshold

    def rss_mb():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024

    if sys.argv[1] == "threshold":
        assert set_mmap_threshold(1 << 20)
    else:  # glibc's default: freeing a 4 MB block raises its dynamic threshold, so 2 MB blocks go to the heap
        block = np.ones((4 << 20) // 8)
        del block
    before = rss_mb()
    tensors = [np.ones((2 << 20) // 8) for _ in range(150)]  # 300 MB, like a step's activations
    still_alive = np.ones((2 << 20) // 8)  # allocated last: the heap cannot shrink below it
    del tensors
    print(rss_mb() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_mmap_threshold_returns_freed_tensors_to_the_os():
    def retained(mode):
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return float(out.stdout)

    heap, mapped = retained("heap"), retained("threshold")
    assert heap > 250  # the freed 300 MB stay resident in the heap
    assert mapped < 30  # each tensor had its own mapping, unmapped on free


def test_threshold_is_a_training_option():
    from lars_ort.allocator import set_mmap_threshold
    from lars_ort.config import TrainingArgs

    assert TrainingArgs().mmap_threshold_mb == 1.0 and TrainingArgs().memory_reuse is False
    assert set_mmap_threshold(0) is False  # 0 leaves glibc's default alone
