"""Start N workers of a run script on this machine: free localhost ports, TF_CONFIG each, prefixed output.

Usage: python tools/launch_workers.py <run script> --nb_workers N [--flag=value ...]
(./run_local.sh calls it when --nb_workers is given). Every line a worker prints is shown prefixed with
"[worker i] " on the same stream. When one worker fails, the others are stopped (SIGTERM, then SIGKILL);
the exit status is the first failing worker's, or 0. SIGINT/SIGTERM to the launcher reach every worker.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

STOP_GRACE_SECONDS = 30.0


def parse_nb_workers(args):
    """(N, the arguments without --nb_workers); N is 1 when absent. Raises ValueError on a bad value."""
    rest, count = [], 1
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--nb_workers" and index + 1 < len(args):
            value, index = args[index + 1], index + 2
        elif arg.startswith("--nb_workers="):
            value, index = arg.split("=", 1)[1], index + 1
        else:
            rest.append(arg)
            index += 1
            continue
        if not value.isdigit() or int(value) < 1:
            raise ValueError("--nb_workers=%s is not valid; expected a whole number >= 1" % value)
        count = int(value)
    return count, rest


def free_ports(count):
    """count distinct localhost ports free right now (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("localhost", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tf_config(addresses, index):
    """The TF_CONFIG JSON of worker `index` of the cluster `addresses`."""
    return json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})


def _relay(stream, target, prefix, lock):
    for line in iter(stream.readline, ""):
        with lock:
            target.write(prefix + line)
            target.flush()
    stream.close()


def launch(command, count, env=None):
    """Run `command` as `count` workers; returns the exit status (first failure, else 0)."""
    addresses = ["localhost:%d" % port for port in free_ports(count)]
    lock = threading.Lock()
    workers, relays = [], []
    for index in range(count):
        worker_env = dict(env if env is not None else os.environ, TF_CONFIG=tf_config(addresses, index),
                          PYTHONUNBUFFERED="1")
        process = subprocess.Popen(command + ["--nb_workers=%d" % count], env=worker_env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        workers.append(process)
        for stream, target in ((process.stdout, sys.stdout), (process.stderr, sys.stderr)):
            relay = threading.Thread(target=_relay, args=(stream, target, "[worker %d] " % index, lock), daemon=True)
            relay.start()
            relays.append(relay)

    def forward(signum, frame):  # pylint: disable=unused-argument
        for process in workers:
            if process.poll() is None:
                process.send_signal(signum)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)

    status = 0
    while [process.poll() for process in workers].count(None):
        failed = [p.returncode for p in workers if p.returncode not in (None, 0)]
        if failed and not status:
            status = failed[0]
            _stop_all(workers)
        time.sleep(0.1)
    if not status:
        status = next((p.returncode for p in workers if p.returncode), 0)
    for relay in relays:
        relay.join(timeout=5)
    # A worker killed by a signal has a negative return code; the shell convention is 128 + signum.
    return 128 - status if status < 0 else status


def _stop_all(workers):
    """SIGTERM every running worker (they stop at a safe point), SIGKILL those still running after a grace."""
    for process in workers:
        if process.poll() is None:
            process.terminate()
    deadline = time.time() + STOP_GRACE_SECONDS
    while time.time() < deadline and any(p.poll() is None for p in workers):
        time.sleep(0.1)
    for process in workers:
        if process.poll() is None:
            process.kill()


def main(argv):
    """Entry point: argv = [run script, flags...]."""
    try:
        count, rest = parse_nb_workers(argv[1:])
    except ValueError as exc:
        sys.stderr.write("error: %s\n" % exc)
        return 2
    if not rest or not os.path.isfile(rest[0]):
        sys.stderr.write("error: run script %r is not a file; expected e.g. nets/convnet_at_fmnist_run.py\n"
                         % (rest[0] if rest else ""))
        return 2
    command = [sys.executable] + rest
    if count == 1:
        return subprocess.call(command)
    return launch(command, count)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
