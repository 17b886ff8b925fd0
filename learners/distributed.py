"""Multi-worker training on TensorFlow's own runtime: TF_CONFIG, strategy and server, roles, the sync check.

Every worker runs the same run-script command with TF_CONFIG set (the local launcher,
tools/launch_workers.py, sets it for --nb_workers N). Worker 0 is the chief: it alone writes checkpoints,
summaries, reports, settings records and results, and evaluates. The gradients, batch-norm statistics and
activation ranges are all-reduced by tf.compat.v1's MultiWorkerMirroredStrategy (collective ops over a
tf.distribute.Server per worker), so every worker holds the same variables after every step; the sync
check compares a checksum of them.
"""
import dataclasses
import os
import zlib
from typing import Any, List

import numpy as np
import tensorflow as tf

from learners.errors import UserError
from tfquant import files

tf1 = tf.compat.v1
TF_CONFIG_ENV = "TF_CONFIG"
# Test hook: a directory where every sync check also dumps this worker's variables (worker<i>-<when>.npz).
DUMP_ENV = "TFQUANT_TEST_DUMP_VARIABLES"
# A collective step waits this long for the other workers before the run stops (a dead or stopped worker).
DEFAULT_COLLECTIVE_TIMEOUT_SECS = 40.0


class WorkersOutOfSync(UserError):
    """The workers' variables differ (or a worker could not read the chief's checkpoint)."""


class WorkerLost(UserError):
    """A collective step did not complete: another worker died, stopped or is unreachable."""


@dataclasses.dataclass
class Cluster:
    """This process's place in a multi-worker run."""

    workers: List[str]  # host:port of every worker, in task-index order
    task_index: int
    timeout_secs: float = DEFAULT_COLLECTIVE_TIMEOUT_SECS
    strategy: Any = None
    server: Any = None

    @property
    def nb_workers(self):
        """Number of workers."""
        return len(self.workers)

    @property
    def is_chief(self):
        """Worker 0 writes every file and evaluates."""
        return self.task_index == 0


def parse_tf_config(text):
    """The Cluster a TF_CONFIG JSON text describes (workers only: no 'chief', 'ps' or 'evaluator' jobs).

    Args:
      text: the value of TF_CONFIG.
    Returns:
      a Cluster without strategy or server.
    Raises:
      UserError naming TF_CONFIG, the bad part and what was expected.
    """
    where = "TF_CONFIG=%s" % text[:200]
    config = files.loads_json(text, UserError, where)
    expected = ('expected {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}')
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise UserError("%s has no cluster; %s" % (where, expected))
    jobs = sorted(config["cluster"])
    workers = config["cluster"].get("worker")
    if jobs != ["worker"] or not isinstance(workers, list) or not workers:
        raise UserError("%s: cluster jobs are %s; %s (worker 0 is the chief)" % (where, jobs, expected))
    if not all(isinstance(w, str) and w.rpartition(":")[2].isdigit() for w in workers) or len(set(workers)) < len(
            workers):
        raise UserError("%s: workers %s; expected distinct host:port addresses" % (where, workers))
    task = config.get("task")
    index = task.get("index") if isinstance(task, dict) else None
    if (not isinstance(task, dict) or task.get("type") != "worker" or isinstance(index, bool)
            or not isinstance(index, int) or not 0 <= index < len(workers)):
        raise UserError("%s: task %s; expected type worker and an index in 0..%d" % (where, task, len(workers) - 1))
    return Cluster(workers=list(workers), task_index=index)


def cluster_from_environment(timeout_secs=DEFAULT_COLLECTIVE_TIMEOUT_SECS):
    """The Cluster of TF_CONFIG with its strategy and server started, or None when TF_CONFIG is unset.

    A single-worker TF_CONFIG also gives None: that run is the ordinary single-process one.
    """
    text = os.environ.get(TF_CONFIG_ENV, "").strip()
    if not text:
        return None
    cluster = parse_tf_config(text)
    if cluster.nb_workers == 1:
        return None
    cluster.timeout_secs = timeout_secs
    # The strategy reads TF_CONFIG itself. Made in graph mode it only configures sessions (made eagerly it
    # would start a second server on this worker's port); the server is what the sessions connect to.
    with tf.Graph().as_default():
        cluster.strategy = tf1.distribute.experimental.MultiWorkerMirroredStrategy()
    spec = tf.train.ClusterSpec({"worker": cluster.workers})
    try:
        cluster.server = tf.distribute.Server(spec, job_name="worker", task_index=cluster.task_index,
                                              config=session_config(cluster), start=True)
    except (tf.errors.OpError, ValueError) as exc:
        raise UserError("worker %d cannot listen on %s (%s); expected a free port in TF_CONFIG"
                        % (cluster.task_index, cluster.workers[cluster.task_index],
                           " ".join(str(exc).split())[:200])) from None
    return cluster


def session_config(cluster, config=None):
    """A session ConfigProto set up for the strategy's collectives, with the blocking-step timeout."""
    config = config or tf1.ConfigProto()
    config = cluster.strategy.update_config_proto(config)
    # A collective waiting for a dead peer blocks forever otherwise; the run stops with WorkerLost instead.
    config.operation_timeout_in_ms = int(cluster.timeout_secs * 1000)
    return config


def synchronised_variables(next_creator, **kwargs):
    """Variable creator: every variable updated inside a step agrees across workers.

    Float variables assigned in the step (batch-norm moving statistics, activation-range moving
    averages, lazily initialised learned ranges) get MEAN aggregation: each assignment is all-reduced,
    so all workers store the same value. Integer counters (the global step, range step counters) are
    incremented identically everywhere, so the first replica's value is kept.
    """
    dtype = kwargs.get("dtype")
    integer = dtype is not None and tf.as_dtype(dtype).base_dtype.is_integer
    if kwargs.get("aggregation") in (None, tf.VariableAggregation.NONE):
        kwargs["aggregation"] = (tf.VariableAggregation.ONLY_FIRST_REPLICA if integer
                                 else tf.VariableAggregation.MEAN)
    return next_creator(**kwargs)


def local_value(cluster, value):
    """This worker's tensor of a per-replica result of call_for_each_replica (one replica per worker)."""
    return cluster.strategy.experimental_local_results(value)[0]


class SyncCheck:
    """Compares a checksum of every worker's variables through one all-reduce."""

    def __init__(self, cluster):
        """Builds the placeholder and the all-reduce in the current graph (inside the strategy's scope)."""
        self.cluster = cluster
        # Two 16-bit halves of a CRC-32 and their squares: sums stay exact in float64, and
        # n * sum(f^2) == sum(f)^2 holds only when every worker's f is the same.
        self.fingerprint = tf1.placeholder(tf.float64, [4], name="sync_check_fingerprint")

        def reduce():
            return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, self.fingerprint)
        self.total = local_value(cluster, cluster.strategy.extended.call_for_each_replica(reduce))

    def check(self, sess, variables, when):
        """Raise WorkersOutOfSync unless every worker holds the same values; returns the CRC-32.

        Args:
          sess: the training session.
          variables: the variables to compare, in an order every worker shares.
          when: e.g. "at step 120", shown in the message.
        """
        checksum = 0
        values = sess.run(list(variables))
        for value in values:
            checksum = zlib.crc32(np.ascontiguousarray(value).tobytes(), checksum)
        if os.environ.get(DUMP_ENV):
            np.savez(os.path.join(os.environ[DUMP_ENV], "worker%d-%s.npz" % (self.cluster.task_index,
                                                                              when.replace(" ", "_"))),
                     **{variable.op.name: value for variable, value in zip(variables, values)})
        halves = np.array([checksum >> 16, checksum & 0xFFFF], np.float64)
        total = run_collective(self.cluster, sess, self.total, {self.fingerprint: np.concatenate([halves,
                                                                                                  halves ** 2])},
                               when)
        count = float(self.cluster.nb_workers)
        if not np.array_equal(count * total[2:], total[:2] ** 2):
            raise WorkersOutOfSync(
                "workers out of sync %s: the checksums of their variables differ (worker %d: %08x); expected "
                "identical variables on every worker (every worker must see the chief's checkpoints: run them on "
                "a shared file system)" % (when, self.cluster.task_index, checksum))
        return checksum


def run_collective(cluster, sess, fetches, feed_dict=None, when="during training"):
    """sess.run of fetches holding collectives; a timed-out or broken peer becomes WorkerLost."""
    try:
        return sess.run(fetches, feed_dict=feed_dict)
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError, tf.errors.CancelledError,
            tf.errors.AbortedError, tf.errors.InternalError) as exc:
        raise WorkerLost("worker %d: a collective step %s did not complete within %.0f s (%s); expected all %d "
                         "workers running (one stopped or died); run the same command on every worker to resume "
                         "from the chief's last checkpoint"
                         % (cluster.task_index, when, cluster.timeout_secs, type(exc).__name__,
                            cluster.nb_workers)) from None
