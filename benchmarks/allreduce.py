"""All-reduce time per training step with 2 local workers, and a model of step time on N machines.

Each worker (a subprocess of this script, with its TF_CONFIG) builds the ResNet's variables under
tf.compat.v1's MultiWorkerMirroredStrategy, as the learners do, and times one all-reduce of a gradient
for every trainable variable (what the optimizer all-reduces each step: 4 bytes x parameters).
The model: step(N) = compute + 2 (N - 1) x (bytes / N / bandwidth + latency), a ring all-reduce over a
stated bandwidth and latency (--bandwidth_gbit, --latency_ms); the section also gives the bandwidth the
2-worker loopback measurement implies, to check the model's form against it.

  .venv/bin/python -m benchmarks.allreduce            # full run, writes its BENCHMARKS.md section
  .venv/bin/python -m benchmarks.allreduce --quick --output /tmp/allreduce.json
"""
import argparse
import json
import os
import subprocess
import sys

from benchmarks import machine, publish, stats

SECTION = "allreduce"
DEPTHS = (20, 56)
WORKER_ENV = "TFQUANT_ALLREDUCE_WORKER"  # set in the workers: "<depth>,<steps>"


def ring_seconds(nb_bytes, nb_workers, bandwidth_bytes, latency_seconds):
    """Time of a ring all-reduce of nb_bytes over nb_workers: 2(N-1) steps of nb_bytes/N each."""
    if nb_workers <= 1:
        return 0.0
    steps = 2 * (nb_workers - 1)
    return steps * (nb_bytes / nb_workers / bandwidth_bytes + latency_seconds)


def _worker(depth, steps):
    """In a worker process: the per-step all-reduce times (seconds) of ResNet-<depth>'s gradients."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from learners import distributed  # pylint: disable=import-outside-toplevel
    from nets import resnet  # pylint: disable=import-outside-toplevel
    tf1 = tf.compat.v1
    cluster = distributed.cluster_from_environment(timeout_secs=120)
    graph = tf.Graph()
    with graph.as_default(), cluster.strategy.scope():
        def replica():
            images = tf.zeros([1, 28, 28, 1])
            resnet.forward_resnet(images, True, depth, 10)
            gradients = [tf.ones_like(v) for v in tf1.trainable_variables()]
            reduced = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, gradients)
            return tf.group(reduced)
        step_op = distributed.local_value(cluster, cluster.strategy.extended.call_for_each_replica(replica))
        parameters = sum(v.shape.num_elements() for v in tf1.trainable_variables())
        init = tf1.global_variables_initializer()
    times = []
    with tf1.Session(cluster.server.target, graph=graph, config=distributed.session_config(cluster)) as sess:
        sess.run(init)
        for _ in range(3):
            sess.run(step_op)  # warm-up: the first collectives set up the group
        for _ in range(steps):
            seconds, _ = stats.timed(lambda: sess.run(step_op))
            times.append(seconds)
    return {"parameters": int(parameters), "times": times}


def measure(depth, steps):
    """Start 2 local workers; returns {'parameters', 'bytes', 'median_seconds', 'times'} of worker 0."""
    from tools import launch_workers  # pylint: disable=import-outside-toplevel
    addresses = ["localhost:%d" % port for port in launch_workers.free_ports(2)]
    processes = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=launch_workers.tf_config(addresses, index),
                   TF_CPP_MIN_LOG_LEVEL="3", **{WORKER_ENV: "%d,%d" % (depth, steps)})
        processes.append(subprocess.Popen([sys.executable, "-m", "benchmarks.allreduce"], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          cwd=publish.REPO_ROOT))
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, err) in zip(processes, outputs):
        if process.returncode:
            raise publish.BenchmarkError("an all-reduce worker failed (%s)" % err.strip().splitlines()[-1:])
    result = json.loads(outputs[0][0].strip().splitlines()[-1])
    result["bytes"] = 4 * result["parameters"]
    result["median_seconds"] = stats.median(result["times"])
    return result


def model_rows(measured, bandwidth_gbit, latency_ms, compute_seconds, sizes=(1, 2, 4, 8, 16)):
    """[(N, all-reduce seconds, step seconds)] of the ring model for one model's gradient bytes."""
    bandwidth = bandwidth_gbit * 1e9 / 8
    return [(n, ring_seconds(measured["bytes"], n, bandwidth, latency_ms / 1000.0),
             compute_seconds + ring_seconds(measured["bytes"], n, bandwidth, latency_ms / 1000.0))
            for n in sizes]


def render(payload):
    """The BENCHMARKS.md section of a payload."""
    lines = ["## All-reduce per step (2 local workers) and a step-time model for N machines", "",
             "Command: `%s`" % payload["command"], ""] + payload["machine"] + ["",
             "| model | parameters | all-reduced bytes/step | measured all-reduce, 2 local workers (median) |",
             "|---|---|---|---|"]
    for name, result in payload["results"].items():
        lines.append("| %s | %d | %d | %.1f ms |" % (name, result["parameters"], result["bytes"],
                                                     1000 * result["median_seconds"]))
    lines += ["", "Loopback bandwidth the 2-worker measurements imply (model with zero latency, bytes / time): "
              + ", ".join("%s %.2f Gbit/s" % (name, 8e-9 * r["bytes"] / max(r["median_seconds"], 1e-9))
                          for name, r in payload["results"].items())]
    lines += ["", "Ring model: all-reduce(N) = 2(N-1) x (bytes/N / bandwidth + latency), at %.0f Gbit/s and %.2f ms; "
              "step(N) = compute (one worker's step at its per-worker batch) + all-reduce(N)."
              % (payload["bandwidth_gbit"], payload["latency_ms"]), ""]
    for name, result in payload["results"].items():
        lines += ["%s:" % name, "", "| N | all-reduce | step (compute %.0f ms) |" % (1000 * result["compute_seconds"]),
                  "|---|---|---|"]
        for n, reduce_seconds, step_seconds in result["model"]:
            lines.append("| %d | %.1f ms | %.1f ms |" % (n, 1000 * reduce_seconds, 1000 * step_seconds))
        lines.append("")
    return "\n".join(lines)


def main():
    """Measure (or --render_json), print the section, publish it after a full run."""
    if os.environ.get(WORKER_ENV):
        depth, steps = (int(x) for x in os.environ[WORKER_ENV].split(","))
        print(json.dumps(_worker(depth, steps)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    publish.add_arguments(parser)
    parser.add_argument("--bandwidth_gbit", type=float, default=10.0, help="network bandwidth of the model")
    parser.add_argument("--latency_ms", type=float, default=0.05, help="per-message latency of the model")
    parser.add_argument("--compute_ms", type=float, nargs=2, default=(None, None),
                        help="one worker's compute time per step of ResNet-20 and ResNet-56 (default: measured "
                        "elsewhere; the model column then shows the all-reduce share only)")
    args = parser.parse_args()
    if args.render_json:
        payload = publish.load_full_run(args.render_json)
        print(render(payload))
        publish.write_section(SECTION, render(payload), args.markdown)
        return
    load_before = publish.start(args)
    depths, steps = ((20,), 5) if args.quick else (DEPTHS, 50)
    results = {}
    for depth, compute_ms in zip(depths, args.compute_ms):
        result = measure(depth, steps)
        result["compute_seconds"] = (compute_ms or 0.0) / 1000.0
        result["model"] = model_rows(result, args.bandwidth_gbit, args.latency_ms, result["compute_seconds"])
        results["resnet_%d" % depth] = result
    end_info = machine.machine_info(load=machine.end_load(args.quick))
    payload = {"quick": args.quick, "command": publish.command_line(), "bandwidth_gbit": args.bandwidth_gbit,
               "latency_ms": args.latency_ms, "results": results,
               "machine": machine.machine_lines(end_info, load_before)}
    publish.write_json(publish.results_path(args, SECTION), payload)
    print(render(payload))
    if not args.quick:
        publish.publish(SECTION, render(payload), args.markdown, load_before, end_info["load_average"],
                        args.allow_busy)


if __name__ == "__main__":
    publish.run_main(main)
