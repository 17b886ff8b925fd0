"""One deployable model file as its runtime loads and runs it: the memory it adds and its latency.

Every reading is taken in a fresh process (`python -c _SCRIPT`), which imports the runtime, numpy and the test
images before its baseline, so the two RSS readings differ only by creating the session and running one image.
onnxruntime sessions are made by tfquant.export.ort_session (loaded as a file, without tfquant's TensorFlow
import), so a file is measured with the options tfquant checks it with and tells users to use.

Three memory readings per file, each the median over `memory_processes` processes:
- rss_added_kb: RSS after loading and one run minus before, in a process that has run nothing yet (the
  issue's definition). It includes what onnxruntime's first session costs any model (its library code paged in,
  its environment and thread pool: about 9.5 MB for a one-Relu model).
- rss_added_warm_kb: the same, after a one-op model was loaded and run in that process first (the memory a
  further model adds to a process that already runs onnxruntime); None for TFLite.
- rss_added_lean_kb: rss_added_kb with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_, the
  same for every file): loading's freed transient copies go back to the system instead of staying in the heap
  (glibc raises its threshold after freeing a large block, which makes the float model's reading flip between
  about 51 and 68 MB with the process's history); None for TFLite.
- rss_added_lean_warm_kb: both (a one-op session first, the threshold fixed): the RSS of the model itself,
  its weights as the kernels hold them and its kernels' code.
- heap_added_kb: the bytes the session holds in malloc's heap (glibc mallinfo2, in use), without the pages
  the allocator keeps after loading's transient copies are freed; None where mallinfo2 is missing.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

ORT_SESSION = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tfquant", "export",
                           "ort_session.py")

_SCRIPT = r'''
import ctypes, importlib.util, json, sys, time
import numpy as np
kind, path, npz, repeats, warm_path, ort_session_path = sys.argv[1:7]
repeats = int(repeats)
def rss_kb():
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS"))
class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
def heap_kb():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) // 1024
images = np.load(npz)["x_test"][:32].astype(np.float32)
def make(threads, model_path):
    if kind == "onnx":
        session = ort_session.create(model_path, threads=threads)
        name = session.get_inputs()[0].name
        return lambda batch: session.run(None, {name: batch})
    from ai_edge_litert import interpreter as runtime
    interpreter = runtime.Interpreter(model_path=model_path, num_threads=threads or None)
    detail = interpreter.get_input_details()[0]
    state = {"batch": None}
    def run(batch):
        if state["batch"] != len(batch):
            interpreter.resize_tensor_input(detail["index"], [len(batch)] + list(detail["shape"][1:]))
            interpreter.allocate_tensors()
            state["batch"] = len(batch)
        if detail["dtype"] != np.float32:
            scale, zero = detail["quantization"]
            batch = np.clip(np.round(batch / scale + zero), -128, 127).astype(detail["dtype"])
        interpreter.set_tensor(detail["index"], batch)
        interpreter.invoke()
    return run
if kind == "onnx":
    spec = importlib.util.spec_from_file_location("ort_session", ort_session_path)
    ort_session = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ort_session)
    import onnxruntime
    if warm_path:
        warm_session = ort_session.create(warm_path, threads=1)
        warm_session.run(None, {"x": np.zeros([1], np.float32)})
else:
    import ai_edge_litert.interpreter
before, heap_before = rss_kb(), heap_kb()
run = make(1, path)
run(images[:1])
result = {"rss_added_kb": rss_kb() - before,
          "heap_added_kb": None if heap_before is None else heap_kb() - heap_before}
latency = {}
for threads in ((1, 0) if repeats else ()):
    run = make(threads, path)
    for batch in (1, 32):
        data = images[:batch] if batch <= len(images) else np.repeat(images, -(-batch // len(images)), 0)[:batch]
        run(data)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(data)
            times.append(time.perf_counter() - start)
        latency["b%d_t%s" % (batch, threads or "all")] = 1000 * float(np.median(times))
result["latency_ms"] = latency
print(json.dumps(result))
'''


def warmup_model(path):
    """Write a one-op ONNX model (Relu of a float [1] input 'x'), the session that initializes onnxruntime."""
    import onnx  # pylint: disable=import-outside-toplevel
    from onnx import TensorProto, helper  # pylint: disable=import-outside-toplevel
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "warmup",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


# glibc's threshold above which malloc maps a block of its own (and unmaps it on free); fixing it stops glibc
# from raising it at run time.
LEAN_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _process(kind, path, npz, repeats, warm_path, cwd, malloc_env=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(malloc_env or {}))
    done = subprocess.run([sys.executable, "-c", _SCRIPT, kind, path, npz, str(repeats), warm_path, ORT_SESSION],
                          capture_output=True, text=True, cwd=cwd, env=env)
    if done.returncode != 0:
        raise RuntimeError("measuring %s failed:\n%s" % (path, done.stderr[-2000:]))
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def measure(kind, path, npz, repeats, memory_processes, cwd):
    """Memory and latency of one file ('onnx' or 'tflite'), each reading in fresh processes.

    Args:
      kind: 'onnx' or 'tflite'.
      path: the model file.
      npz: an archive whose x_test holds float32 input images.
      repeats: timed runs per latency figure (in the first process).
      memory_processes: processes per memory reading (for ONNX, each of the four); the medians are reported.
      cwd: working directory of the processes.
    Returns:
      {rss_added_kb, rss_added_kb_runs, rss_added_warm_kb, rss_added_lean_kb, rss_added_lean_warm_kb, heap_added_kb,
      latency_ms: {b1_t1, b32_t1, b1_tall, b32_tall}}.
    """
    cold = [_process(kind, path, npz, repeats if number == 0 else 0, "", cwd) for number in range(memory_processes)]
    warm, lean, lean_warm = [], [], []
    if kind == "onnx":
        with tempfile.TemporaryDirectory() as directory:
            warm_path = warmup_model(os.path.join(directory, "warmup.onnx"))
            for _ in range(memory_processes):
                warm.append(_process(kind, path, npz, 0, warm_path, cwd))
                lean.append(_process(kind, path, npz, 0, "", cwd, LEAN_MALLOC))
                lean_warm.append(_process(kind, path, npz, 0, warm_path, cwd, LEAN_MALLOC))
    return {"rss_added_kb": _median([r["rss_added_kb"] for r in cold]),
            "rss_added_kb_runs": [r["rss_added_kb"] for r in cold],
            "rss_added_warm_kb": _median([r["rss_added_kb"] for r in warm]),
            "rss_added_lean_kb": _median([r["rss_added_kb"] for r in lean]),
            "rss_added_lean_warm_kb": _median([r["rss_added_kb"] for r in lean_warm]),
            "heap_added_kb": _median([r["heap_added_kb"] for r in cold]),
            "latency_ms": cold[0]["latency_ms"]}
