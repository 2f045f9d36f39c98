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


# What the ORT children below share: the resident memory, a model of float32 inputs with one scalar output y, and
# the run as the engine binds it (the inputs and the output in the caller's buffers: an output ORT allocated would
# sit in an arena region and keep that region from being freed).
ORT_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from lars_ort.session import run_options, session_options

    def mb(field="VmRSS"):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) / 1024

    def model(nodes, inputs, initializers):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, TensorProto.FLOAT, [f"{x}_length"])
                                               for x in inputs],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()

    def bound(session, **feeds):
        y = np.zeros((), np.float32)
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_numpy(y))
        return binding, y
""")


ARENA_CHILD = ORT_CHILD + textwrap.dedent("""
    # y = max((x * max(x) + 2) * 2): three [n] float32 temporaries of 256 MB, each dead before the next-but-one.
    # The arena's first region is never shrunk (ORT's rule for its default extend strategy), so, as in a training
    # step, a small tensor comes first and that region stays small.
    n = 64 << 20
    graph = model(
        [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0), helper.make_node("Mul", ["x", "m"], ["a"]),
         helper.make_node("Add", ["a", "two"], ["b"]),
         helper.make_node("Mul", ["b", "two"], ["c"]), helper.make_node("ReduceMax", ["c"], ["y"], keepdims=0)],
        ["x"], [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    arena = sys.argv[1] in ("arena", "kept")
    session = ort.InferenceSession(graph, session_options(ort, threads=1, memory_arena=arena),
                                   providers=["CPUExecutionProvider"])
    binding, y = bound(session, x=np.ones(n, np.float32))
    before = mb()
    for _ in range(3):
        session.run_with_iobinding(binding, run_options(ort, sys.argv[1] == "arena"))
    assert y == 6.0, y
    print(mb() - before)
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


EXACT_CHILD = ORT_CHILD + textwrap.dedent("""
    # a (256 MB) alive while b (300 MB) is made, then s (200 MB) while b lives and a is free. Doubling regions: b's
    # region is 512 MB and s goes in its untouched 212 MB tail (best fit), fresh pages beside a's freed 256 MB.
    # Exact regions: b's region is 300 MB and s reuses a's pages.
    M = 1 << 20
    graph = model(
        [helper.make_node("Mul", ["x", "two"], ["a"]), helper.make_node("Concat", ["a", "e"], ["b"], axis=0),
         helper.make_node("Slice", ["b", "start", "stop"], ["s"]), helper.make_node("Mul", ["s", "two"], ["c"]),
         helper.make_node("ReduceMax", ["c"], ["y"], keepdims=0)],
        ["x", "e"], [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
                     helper.make_tensor("start", TensorProto.INT64, [1], [0]),
                     helper.make_tensor("stop", TensorProto.INT64, [1], [50 * M])])
    session = ort.InferenceSession(graph, session_options(ort, threads=1, arena_regions=sys.argv[1]),
                                   providers=["CPUExecutionProvider"])
    binding, y = bound(session, x=np.ones(64 * M, np.float32), e=np.ones(11 * M, np.float32))
    before = mb()
    session.run_with_iobinding(binding, run_options(ort))
    assert y == 4.0, y
    print(ort.__version__, mb("VmHWM") - before, mb() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status")
@pytest.mark.parametrize("build", ["onnxruntime", "onnxruntime-training"])
def test_exact_arena_regions_leave_no_untouched_tail(build):
    """arena_regions="exact" (an arena in ORT's environment grown by what is asked for) takes the step's tensors on
    both builds: measured 574 MB against 781 MB at the peak, and it is shrunk after the run like the session's own
    (whose first region stays: 265 MB kept)."""
    import os

    from lars_export import ort_training

    env = ort_training.child_env() if build == "onnxruntime-training" else dict(os.environ)

    def measured(regions):
        out = subprocess.run([sys.executable, "-c", EXACT_CHILD, regions], capture_output=True, text=True,
                             timeout=300, env=env)
        assert out.returncode == 0, out.stderr
        version, peak, kept = out.stdout.split()
        return version, float(peak), float(kept)

    (version, doubling, _), (_, exact, kept) = measured("doubling"), measured("exact")
    assert version.startswith("1.19.") == (build == "onnxruntime-training")
    assert doubling > 720 and exact < 620  # 756 MB and 556 MB of tensors
    assert kept < 64


MEDIUM_CHILD = ORT_CHILD + textwrap.dedent("""
    block = np.ones((32 << 20) // 8)  # freed: glibc's dynamic mmap threshold rises to 32 MB, as a step raises it
    del block
    # 30 tensors of 8 MB alive at once (a region each with exact regions), summed
    n, k = 2 << 20, 30
    nodes = [helper.make_node("Mul", ["x", f"c{i}"], [f"a{i}"]) for i in range(k)]
    nodes += [helper.make_node("Sum", [f"a{i}" for i in range(k)], ["s"]),
              helper.make_node("ReduceMax", ["s"], ["y"], keepdims=0)]
    graph = model(nodes, ["x"], [helper.make_tensor(f"c{i}", TensorProto.FLOAT, [], [float(i)]) for i in range(k)])
    session = ort.InferenceSession(graph, session_options(ort, threads=1, arena_regions=sys.argv[1]),
                                   providers=["CPUExecutionProvider"])
    binding, y = bound(session, x=np.ones(n, np.float32))
    before = mb()
    for _ in range(2):
        session.run_with_iobinding(binding, run_options(ort))
    assert y == sum(range(k)), y
    print(mb() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt, /proc/self/status")
def test_exact_arena_regions_below_glibcs_threshold_leave_memory_too():
    """Exact regions are as small as the tensors; without the runtime's mmap threshold glibc would put those under
    its raised dynamic threshold on its heap and keep them after the arena frees them (measured: all 240 MB kept
    here, 667 MB between SmolLM2's steps at 1024 tokens)."""
    out = subprocess.run([sys.executable, "-c", MEDIUM_CHILD, "exact"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 48  # of 240 MB


def test_exact_arena_regions_are_a_session_setting_and_need_the_arena():
    import onnxruntime as ort

    from lars_artifacts import LarsError
    from lars_ort.config import TrainingArgs
    from lars_ort.session import session_options

    assert TrainingArgs().arena_regions == "auto"  # the bundle's: doubling unless its budget was priced on exact
    with pytest.raises(RuntimeError, match="does not have configuration with key"):  # unset: the session's own
        session_options(ort).get_session_config_entry("session.use_env_allocators")
    assert session_options(ort, arena_regions="exact").get_session_config_entry("session.use_env_allocators") == "1"
    with pytest.raises(LarsError, match="--no-memory-arena turns it off; drop one"):
        session_options(ort, memory_arena=False, arena_regions="exact")
    with pytest.raises(LarsError, match="--arena-regions must be one of auto, doubling, exact, got 'next'"):
        session_options(ort, arena_regions="next")
    with pytest.raises(LarsError, match="must be resolved against the bundle first"):  # a session never guesses
        session_options(ort, arena_regions="auto")


def test_threads_default_to_the_cores_the_process_may_use(monkeypatch):
    import os

    from lars_ort import session

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3}, raising=False)
    assert session.available_cores() == 2  # taskset / a container's cpuset: 2 of the machine's 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert session.available_cores() in (0, *range(1, 8))  # all cores: ORT's default, unless a cgroup quota caps it


def test_a_trainer_with_exact_arena_regions_trains_as_with_doubling_ones(tiny_bundles):
    """Where the tensors live changes no number: the same steps give the same losses and adapters, bit for bit."""
    import numpy as np

    from lars_ort import Trainer

    default = Trainer(tiny_bundles["llama"], load_eval=False)  # auto, and the bundle has no budget: doubling regions
    assert default.bundle.manifest.memory_plan.arena_regions is None
    with pytest.raises(RuntimeError, match="does not have configuration with key"):
        default.engine.session.get_session_options().get_session_config_entry("session.use_env_allocators")
    runs = {}
    for regions in ("doubling", "exact"):
        trainer = Trainer(tiny_bundles["llama"], load_eval=False, arena_regions=regions)
        if regions == "exact":  # the session takes its tensors from the environment's arena
            options = trainer.engine.session.get_session_options()
            assert options.get_session_config_entry("session.use_env_allocators") == "1"
        ids = np.random.default_rng(0).integers(1, trainer.bundle.manifest.vocab_size, size=(2, 16))
        runs[regions] = [trainer.step(trainer.batch(ids), 1e-3) for _ in range(3)], trainer.adapter_tensors()
    assert runs["exact"][0] == runs["doubling"][0] and runs["doubling"][0][2] < runs["doubling"][0][0]
    for name, value in runs["doubling"][1].items():
        np.testing.assert_array_equal(runs["exact"][1][name], value, err_msg=name)
