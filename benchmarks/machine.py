"""Machine facts a reader needs to compare figures, and the rule that keeps busy-machine figures out of
BENCHMARKS.md: a full run refuses to publish when the 1-minute load average exceeds half the cores at its
start or end, unless --allow_busy is given (the section then says so)."""
import datetime
import os
import platform
import time

# How long a full run waits at its end for its own load to fade before reading the load it records.
SETTLE_SECONDS = 150


def read_load():
    """The (1, 5, 15)-minute load averages, rounded to 0.01, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def end_load(quick=False):
    """The load average to record at a run's end, read once the run's own work has faded from it.

    A CPU-bound benchmark keeps the 1-minute average near its own thread count until it ends, so an immediate
    reading would call every full run on 2 cores busy. A full run waits (up to SETTLE_SECONDS, polling every
    5 s) for the 1-minute average to fall to half the cores; what is left after that is other processes'.
    A quick run reads at once. Returns the reading, as read_load.
    """
    load = read_load()
    deadline = time.monotonic() + (0 if quick else SETTLE_SECONDS)
    while load and load[0] > 0.5 * cores() and time.monotonic() < deadline:
        time.sleep(5)
        load = read_load()
    return load


def cores():
    return os.cpu_count() or 1


def machine_info(load=None):
    """Cores, CPU model, TensorFlow, Python, platform, date and the load average now (or `load`)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cores": cores(), "cpu": cpu, "tensorflow": tf.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "load_average": read_load() if load is None else load}


def busy_readings(load_before, load_after, core_count):
    """The 1-minute readings ('start'/'end', value) above half of core_count; empty when quiet."""
    limit = 0.5 * core_count
    return [(when, load[0]) for when, load in (("start", load_before), ("end", load_after))
            if load and load[0] > limit]


def busy_message(readings, core_count):
    """One line describing a busy machine, for errors and for the section's busy marker."""
    return "1-minute load average %s, above half of the %d cores" % (
        " and ".join("%.2f at the %s" % (value, when) for when, value in readings), core_count)


def machine_lines(info, load_before, session_threads=None):
    """Markdown bullets: machine, software, date, load before and after, and a busy marker if it was busy."""
    lines = ["- Machine: %d CPU cores, %s; TensorFlow %s, Python %s%s; %s" % (
        info["cores"], info["cpu"], info["tensorflow"], info["python"],
        "; sessions with %d intra-op threads" % session_threads if session_threads else "", info["date"]),
        "- Load average (1/5/15 min) before: %s, after: %s" % (load_before, info["load_average"])]
    readings = busy_readings(load_before, info["load_average"], info["cores"])
    if readings:
        lines.append("- **Measured on a busy machine** (%s; published with --allow_busy)."
                     % busy_message(readings, info["cores"]))
    return lines
