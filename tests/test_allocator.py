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


ARENA_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from lars_ort.session import run_options, session_options

    def rss_mb():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024

    # y = max((x * max(x) + 2) * 2): three [n] float32 temporaries of 256 MB, each dead before the next-but-one.
    # The arena's first region is never shrunk (ORT's rule for its default extend strategy), so, as in a training
    # step, a small tensor comes first and that region stays small.
    n = 64 << 20
    graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0), helper.make_node("Mul", ["x", "m"], ["a"]),
         helper.make_node("Add", ["a", "two"], ["b"]),
         helper.make_node("Mul", ["b", "two"], ["c"]), helper.make_node("ReduceMax", ["c"], ["y"], keepdims=0)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    arena = sys.argv[1] in ("arena", "kept")
    session = ort.InferenceSession(model, session_options(ort, threads=1, memory_arena=arena),
                                   providers=["CPUExecutionProvider"])
    x, y = np.ones(n, np.float32), np.zeros((), np.float32)
    # As the engine binds them: the input and the output in the caller's buffers (an output ORT allocated would sit
    # in an arena region and keep that region from being freed).
    binding = session.io_binding()
    binding.bind_cpu_input("x", x)
    binding.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_numpy(y))
    before = rss_mb()
    for _ in range(3):
        session.run_with_iobinding(binding, run_options(ort, sys.argv[1] == "arena"))
    assert y == 6.0, y
    print(rss_mb() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status")
def test_the_arena_is_handed_back_after_every_step():
    """The runtime's default: ORT's arena serves a step's tensors and shrinks at the end of the run (run option),
    so between steps the process holds what it held before, as with a malloc per tensor."""
    def retained(mode):
        out = subprocess.run([sys.executable, "-c", ARENA_CHILD, mode], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return float(out.stdout)

    assert retained("arena") < 64  # of the 3 x 256 MB temporaries
    assert retained("malloc") < 64
    assert retained("kept") > 250  # the arena without the run option keeps its regions


def test_the_arena_is_the_default_without_memory_patterns():
    import onnxruntime as ort

    from lars_ort.config import TrainingArgs
    from lars_ort.session import ARENA_SHRINKAGE, run_options, session_options

    assert TrainingArgs().memory_arena is True
    options = session_options(ort)
    assert options.enable_cpu_mem_arena and not options.enable_mem_pattern and not options.enable_mem_reuse
    assert run_options(ort).get_run_config_entry(ARENA_SHRINKAGE) == "cpu:0"
    assert not session_options(ort, memory_arena=False).enable_cpu_mem_arena


def test_threads_default_to_the_cores_the_process_may_use(monkeypatch):
    import os

    from lars_ort import session

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3}, raising=False)
    assert session.available_cores() == 2  # taskset / a container's cpuset: 2 of the machine's 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert session.available_cores() in (0, *range(1, 8))  # all cores: ORT's default, unless a cgroup quota caps it
