"""`python -m tfquant.report RUN_DIR [OTHER_RUN_DIR]`: render quant_report.html again, or compare two runs.

With one directory, its quant_report.html is written again from its JSON files. With two, both pages are
written and the per-layer differences (bits, SQNR, output SQNR, the analysis's accuracy gain if float and loss
removed at the suggested override) and the runs' accuracies are printed. Like `python -m tfquant.export`, this is an edge of the library: the one module of
it that prints.
"""
import argparse
import sys

from tfquant import report_html
from tfquant.report import ReportError

USAGE = "python -m tfquant.report RUN_DIR [OTHER_RUN_DIR]"


def _by_name(entries):
    return {entry.get("name"): entry for entry in entries or [] if isinstance(entry, dict)}


def _shown(value):
    return report_html.number_text(value) if value is not None else "-"


def _difference(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return "%+.4g" % (b - a)
    return "-"


def comparison_lines(first, second):
    """Text lines comparing two runs' (report, results, analysis) tuples layer by layer (first -> second)."""
    (report_a, results_a, analysis_a), (report_b, results_b, analysis_b) = first, second
    lines = []
    for field in ("float_accuracy", "quant_accuracy"):
        a, b = (results_a or {}).get(field), (results_b or {}).get(field)
        lines.append("%-16s %s -> %s (%s)" % (field, _shown(a), _shown(b), _difference(a, b)))
    for field in ("total_storage_bits", "compression_ratio"):
        a, b = report_a["summary"].get(field), report_b["summary"].get(field)
        lines.append("%-16s %s -> %s (%s)" % (field, _shown(a), _shown(b), _difference(a, b)))
    fidelity_a = _by_name((report_a.get("fidelity") or {}).get("layers"))
    fidelity_b = _by_name((report_b.get("fidelity") or {}).get("layers"))
    gain_a = _by_name((analysis_a or {}).get("layers"))
    gain_b = _by_name((analysis_b or {}).get("layers"))
    layers_b = _by_name(report_b["layers"])
    header = ("layer", "bits", "SQNR dB", "output SQNR dB", "gain if float", "loss removed at override")
    rows = []
    names = [layer["name"] for layer in report_a["layers"]]
    names += [layer["name"] for layer in report_b["layers"] if layer["name"] not in set(names)]
    layers_a = _by_name(report_a["layers"])
    for name in names:
        la, lb = layers_a.get(name, {}), layers_b.get(name, {})
        cells = [la.get("weight_variable") or lb.get("weight_variable") or name,
                 "%s -> %s" % (_shown(la.get("bits")), _shown(lb.get("bits")))]
        for source_a, source_b, field in ((fidelity_a, fidelity_b, "sqnr_db"), (fidelity_a, fidelity_b,
                                                                               "output_sqnr_db"),
                                          (gain_a, gain_b, "recovery_if_float"),
                                          (gain_a, gain_b, "loss_recovery_at_override")):
            a, b = source_a.get(name, {}).get(field), source_b.get(name, {}).get(field)
            cells.append("%s -> %s (%s)" % (_shown(a), _shown(b), _difference(a, b)))
        rows.append(cells)
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    lines.extend("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
    return lines


def main(argv=None):
    """The command; returns its exit status (2 with one `error:` line for a run directory that does not fit)."""
    parser = argparse.ArgumentParser(prog="python -m tfquant.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("other_run_dir", nargs="?")
    args = parser.parse_args(argv)
    try:
        first = report_html.load_run(args.run_dir)
        print("report: %s" % report_html.write_report_html(args.run_dir))
        if args.other_run_dir is not None:
            second = report_html.load_run(args.other_run_dir)
            print("report: %s" % report_html.write_report_html(args.other_run_dir))
            for line in comparison_lines(first, second):
                print(line)
    except ReportError as exc:
        sys.stderr.write("error: %s\n" % " ".join(str(exc).split()))
        return 2
    except OSError as exc:
        sys.stderr.write("error: %s cannot be written (%s); expected a writable run directory\n"
                         % (exc.filename or args.run_dir, exc.strerror or exc))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
