"""quant_report.html: a run directory's report as one self-contained page (inline SVG, no script, no link).

Everything shown comes from the run directory's JSON files (quant_report.json, results.json when the
learner wrote it, analysis.json when `--exec_mode analyze` ran), and every number on the page is printed
as the JSON holds it (shortest round-trip form) inside an element whose `data-key` names where it came
from, e.g. `fidelity.layers.3.sqnr_db`, so a reader (or a test) can check each one against the file.
"""
import html
import os

from tfquant import files
from tfquant.report import REPORT_NAME, ReportError, read_report

HTML_NAME = "quant_report.html"
RESULTS_NAME = "results.json"
ANALYSIS_NAME = "analysis.json"
_CHART_WIDTH = 720
_BAR_HEIGHT = 12
_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td.n,th.n{text-align:left}
h2{margin-top:1.6em}svg{font-size:10px}details{margin:.3em 0}.skipped{color:#888}
"""


def read_json_file(path, what):
    """A JSON file of the run directory (strictly parsed), or None when it does not exist."""
    if not os.path.exists(path):
        return None
    text = files.read_text(path, lambda message: ReportError(message, path), what, files.SMALL_FILE_LIMIT)
    data = files.loads_json(text, lambda message: ReportError(message, path), "%s %s" % (what, path))
    if not isinstance(data, dict):
        raise ReportError("%s %s is not a JSON object; expected the file a tfquant run writes" % (what, path), path)
    return data


def load_run(run_dir):
    """(report dict, results dict or None, analysis dict or None) of a run directory.

    Raises:
      ReportError: a file is missing (the report), unreadable or malformed.
    """
    report = read_report(os.path.join(run_dir, REPORT_NAME)).to_dict()
    results = read_json_file(os.path.join(run_dir, RESULTS_NAME), "results file")
    analysis_path = os.path.join(run_dir, ANALYSIS_NAME)
    analysis = read_json_file(analysis_path, "analysis file")
    layers = (analysis or {}).get("layers", [])
    if not isinstance(layers, list) or not all(isinstance(entry, dict) for entry in layers):
        raise ReportError("analysis file %s: layers is not a list of objects; expected the file --exec_mode analyze "
                          "writes" % analysis_path, analysis_path)
    return report, results, analysis


def number_text(value):
    """How a JSON number is printed: ints as they are, floats in shortest round-trip form, null as '–'."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def _cell(value, key, tag="td"):
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key:
        return '<%s data-key="%s">%s</%s>' % (tag, html.escape(key), number_text(value), tag)
    return '<%s class="n">%s</%s>' % (tag, html.escape("–" if value is None else str(value)), tag)


def _table(header, rows):
    head = "".join('<th class="n">%s</th>' % html.escape(h) for h in header)
    return "<table><tr>%s</tr>%s</table>" % (head, "".join("<tr>%s</tr>" % "".join(r) for r in rows))


def _summary(report, results):
    summary = report.get("summary", {})
    rows = []
    if results:
        for field in ("float_accuracy", "quant_accuracy", "test_examples"):
            if field in results:
                rows.append([_cell(field, ""), _cell(results[field], "results." + field)])
    for field in ("float_storage_bits", "total_storage_bits", "compression_ratio", "weight_compression_ratio",
                  "weight_layers_quantized", "activation_layers_quantized"):
        if field in summary:
            rows.append([_cell(field, ""), _cell(summary[field], "report.summary." + field)])
    output = (report.get("fidelity") or {}).get("output") or {}
    for field in ("sqnr_db", "top1_agreement", "examples"):
        if field in output:
            rows.append([_cell("logits " + field + " (quantized vs float)", ""),
                         _cell(output[field], "report.fidelity.output." + field)])
    return "<h2>Run</h2>" + _table(["", "value"], rows)


_FIDELITY_FIELDS = ("sqnr_db", "rmse_over_step", "clipped_fraction", "output_sqnr_db")


def _layer_table(report, fidelity_index):
    header = ["layer", "kind", "op", "bits", "params", "code bits", "range bits", "SQNR dB", "RMSE/step", "clipped",
              "range used", "observed", "output SQNR dB", "status"]
    rows = []
    for i, layer in enumerate(report["layers"]):
        key = "report.layers.%d." % i
        row = [_cell(layer.get("weight_variable") or layer["name"], ""), _cell(layer["kind"], ""),
               _cell(layer["op_type"], ""), _cell(layer["bits"], key + "bits"),
               _cell(layer.get("num_params"), key + "num_params"),
               _cell(layer.get("weight_storage_bits"), key + "weight_storage_bits"),
               _cell(layer.get("bucket_storage_bits"), key + "bucket_storage_bits")]
        found = fidelity_index.get(layer["name"])
        if found is None:
            row += [_cell(None, "")] * 6
        else:
            j, entry = found
            fkey = "report.fidelity.layers.%d." % j
            row += [_cell(entry.get(f), fkey + f) for f in _FIDELITY_FIELDS[:3]]
            for field in ("range_used", "observed"):
                low, high = entry.get(field) or [None, None]
                row.append('<td>%s … %s</td>' % (_cell(low, fkey + field + ".0", "span"),
                                                  _cell(high, fkey + field + ".1", "span")))
            row.append(_cell(entry.get("output_sqnr_db"), fkey + "output_sqnr_db"))
        status = layer["status"] if layer["status"] == "quantized" else "skipped: " + layer.get("reason", "")
        row.append(_cell(status, ""))
        rows.append(row)
    return "<h2>Layers</h2>" + _table(header, rows)


def _bar_chart(title, items):
    """Horizontal bars: items are (label, value, data-key); negative values are drawn from the same axis."""
    items = [item for item in items if item[1] is not None]
    if not items:
        return ""
    label_width, chart = 260, _CHART_WIDTH - 330
    top = max(max(value for _, value, _ in items), 0.0)
    bottom = min(min(value for _, value, _ in items), 0.0)
    span = (top - bottom) or 1.0
    zero = label_width + chart * (-bottom / span)
    parts = ['<svg width="%d" height="%d">' % (_CHART_WIDTH, _BAR_HEIGHT * len(items) + 4)]
    for row, (label, value, key) in enumerate(items):
        y = row * _BAR_HEIGHT + 2
        x = zero + min(value, 0.0) / span * chart
        width = abs(value) / span * chart
        parts.append('<text x="%d" y="%d" text-anchor="end">%s</text>' % (label_width - 4, y + 9,
                                                                          html.escape(label[-40:])))
        parts.append('<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="#4a7ab5"/>'
                     % (x, y, max(width, 0.5), _BAR_HEIGHT - 2))
        parts.append('<text x="%.1f" y="%d" data-key="%s">%s</text>'
                     % (max(x + width, zero) + 3, y + 9, html.escape(key), number_text(value)))
    parts.append("</svg>")
    return "<h3>%s</h3>%s" % (html.escape(title), "".join(parts))


def _charts(report, fidelity_layers):
    weights = [(i, layer) for i, layer in enumerate(report["layers"]) if layer["kind"] == "weight"]
    out = ["<h2>Per layer</h2>"]
    out.append(_bar_chart("weight bits", [(l.get("weight_variable") or l["name"], l["bits"],
                                           "report.layers.%d.bits" % i) for i, l in weights]))
    out.append(_bar_chart("weight storage bits (codes)", [(l.get("weight_variable") or l["name"],
                                                           l.get("weight_storage_bits", 0),
                                                           "report.layers.%d.weight_storage_bits" % i)
                                                          for i, l in weights]))
    out.append(_bar_chart("activation bits", [(l["name"], l["bits"], "report.layers.%d.bits" % i)
                                              for i, l in enumerate(report["layers"]) if l["kind"] == "activation"]))
    out.append(_bar_chart("SQNR of each quantizer (dB)", [(e["name"], e.get("sqnr_db"),
                                                           "report.fidelity.layers.%d.sqnr_db" % j)
                                                          for j, e in enumerate(fidelity_layers)]))
    out.append(_bar_chart("SQNR of each layer's output against the float network (dB, accumulated)",
                          [(e["name"], e.get("output_sqnr_db"), "report.fidelity.layers.%d.output_sqnr_db" % j)
                           for j, e in enumerate(fidelity_layers)]))
    return "".join(out)


def _histogram_svg(entry, key):
    histogram = entry.get("histogram")
    if not histogram or not histogram.get("counts"):
        return ""
    counts, (low, high) = histogram["counts"], histogram["range"]
    width, height, peak = 480, 90, max(max(histogram["counts"]), 1)
    span = (high - low) or 1.0
    bar = width / len(counts)
    parts = ['<svg width="%d" height="%d">' % (width, height + 14)]
    for b, count in enumerate(counts):
        h = height * count / peak
        parts.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="#9bb7d9"><title data-key="%s">%d'
                     '</title></rect>' % (b * bar, height - h, max(bar - 1, 0.5), h,
                                          "%s.histogram.counts.%d" % (key, b), count))
    levels = entry.get("levels") or []
    # One path for every level: an 8-bit grid is 256 ticks, which separate elements would make heavy.
    ticks = "".join("M%.1f 0v%d" % ((level - low) / span * width, height) for level in levels
                    if low - span <= level <= high + span)
    if ticks:
        parts.append('<path d="%s" stroke="#c0392b" stroke-width="0.6" opacity="0.8"/>' % ticks)
    parts.append('<text x="0" y="%d" data-key="%s.histogram.range.0">%s</text>'
                 % (height + 12, key, number_text(low)))
    parts.append('<text x="%d" y="%d" text-anchor="end" data-key="%s.histogram.range.1">%s</text>'
                 % (width, height + 12, key, number_text(high)))
    parts.append("</svg>")
    group = entry.get("levels_group")
    note = "%d levels" % len(levels) if levels else "levels not drawn (more than 256)"
    if group is not None:
        note += " of range group <span data-key=\"%s.levels_group\">%d</span>" % (key, group)
    return "".join(parts) + "<div>%s (red)</div>" % note


def _histograms(fidelity_layers):
    if not fidelity_layers:
        return ""
    out = ["<h2>Histograms against the quantization levels</h2>"]
    for j, entry in enumerate(fidelity_layers):
        key = "report.fidelity.layers.%d" % j
        out.append("<details><summary>%s (%s, %s bits)</summary>%s</details>"
                   % (html.escape(entry["name"]), html.escape(entry["kind"]),
                      _cell(entry.get("bits"), key + ".bits", "span"), _histogram_svg(entry, key)))
    return "".join(out)


def _allocation(report):
    allocation = report.get("allocation")
    if not allocation:
        return ""
    out = ["<h2>Automatic bit allocation</h2>"]
    for kind in ("weight", "activation"):
        entry = allocation.get(kind)
        if not isinstance(entry, dict):
            continue
        out.append("<h3>%s: budget %s mean bits, achieved %s</h3>"
                   % (kind, _cell(entry.get("equivalent_bits"), "report.allocation.%s.equivalent_bits" % kind,
                                  "span"),
                      _cell(entry.get("mean_bits"), "report.allocation.%s.mean_bits" % kind, "span")))
        for i, layer in enumerate(entry.get("layers") or []):
            out.append(_sensitivity_svg(layer, "report.allocation.%s.layers.%d" % (kind, i)))
    return "".join(out)


def _sensitivity_svg(layer, key):
    """The loss increase per width (a line) with the chosen width marked."""
    curve = sorted((int(bits), value) for bits, value in (layer.get("sensitivity") or {}).items())
    if not curve:
        return ""
    width, height = 300, 70
    low_bits, high_bits = curve[0][0], curve[-1][0]
    peak = max(max(v for _, v in curve), 1e-12)
    def point(bits, value):
        x = 20 + (bits - low_bits) / max(high_bits - low_bits, 1) * (width - 40)
        return x, height - 5 - value / peak * (height - 15)
    path = " ".join("%s%.1f %.1f" % ("M" if i == 0 else "L", *point(b, v)) for i, (b, v) in enumerate(curve))
    parts = ['<svg width="%d" height="%d"><path d="%s" fill="none" stroke="#4a7ab5"/>'
             % (width, height + 12, path)]
    for bits, value in curve:
        x, y = point(bits, value)
        fill = "#c0392b" if bits == layer.get("bits") else "#4a7ab5"
        parts.append('<circle cx="%.1f" cy="%.1f" r="3" fill="%s"><title data-key="%s.sensitivity.%d">%s</title>'
                     '</circle><text x="%.1f" y="%d" text-anchor="middle">%d</text>'
                     % (x, y, fill, key, bits, number_text(value), x, height + 10, bits))
    parts.append("</svg>")
    return "<div>%s: chosen %s bits%s</div>" % (html.escape(str(layer.get("name"))),
                                                _cell(layer.get("bits"), key + ".bits", "span"), "".join(parts))


def _analysis(analysis):
    if not analysis:
        return ""
    ranked_by = analysis.get("ranked_by")
    order = ("Ranked by the loss the suggested override removes (every layer quantized, this one at the override's "
             "width), worst first." if ranked_by == "loss_recovery_at_override" else "Worst first.")
    out = ["<h2>Layer-by-layer analysis</h2><p>On %s test images: float %s, quantized %s (loss %s). %s</p>"
           % (_cell(analysis.get("examples"), "analysis.examples", "span"),
              _cell(analysis.get("float_accuracy"), "analysis.float_accuracy", "span"),
              _cell(analysis.get("quantized_accuracy"), "analysis.quantized_accuracy", "span"),
              _cell(analysis.get("quantized_loss"), "analysis.quantized_loss", "span"), html.escape(order))]
    rows = []
    fields = ("bits", "accuracy_alone_quantized", "accuracy_all_but_this_quantized", "recovery_if_float",
              "override_bits", "accuracy_at_override", "recovery_at_override", "loss_recovery_at_override")
    for i, entry in enumerate(analysis.get("layers") or []):
        key = "analysis.layers.%d." % i
        rows.append([_cell(entry.get("weight_variable") or entry.get("name"), ""), _cell(entry.get("kind"), "")]
                    + [_cell(entry.get(field), key + field) for field in fields] + [_cell(entry.get("override"), "")])
    out.append(_table(["layer", "kind", "bits", "accuracy, only this quantized", "accuracy, all but this",
                       "gain if float", "override bits", "accuracy at override", "gain at override",
                       "loss removed at override", "override"], rows))
    if ranked_by == "loss_recovery_at_override":
        out.append(_bar_chart("loss removed by the suggested override",
                              [(e.get("name"), e.get("loss_recovery_at_override"),
                                "analysis.layers.%d.loss_recovery_at_override" % i)
                               for i, e in enumerate(analysis.get("layers") or [])]))
    out.append(_bar_chart("accuracy gained by keeping the layer float",
                          [(e.get("name"), e.get("recovery_if_float"), "analysis.layers.%d.recovery_if_float" % i)
                           for i, e in enumerate(analysis.get("layers") or [])]))
    return "".join(out)


def render(report, results=None, analysis=None):
    """The page for a report dict (QuantReport.to_dict()), results and analysis dicts (or None)."""
    fidelity_layers = (report.get("fidelity") or {}).get("layers") or []
    index = {entry["name"]: (j, entry) for j, entry in enumerate(fidelity_layers)}
    title = "tfquant report"
    if results and results.get("model"):
        title += ": %s on %s" % (results.get("model"), results.get("dataset"))
    body = [_summary(report, results), _layer_table(report, index), _charts(report, fidelity_layers),
            _histograms(fidelity_layers), _allocation(report), _analysis(analysis)]
    notes = "".join("<li>%s</li>" % html.escape(note) for note in report.get("notes") or [])
    return ('<!DOCTYPE html><html><head><meta charset="utf-8"><title>%s</title><style>%s</style></head><body>'
            '<h1>%s</h1>%s%s</body></html>\n' % (html.escape(title), _STYLE, html.escape(title), "".join(body),
                                                 "<h2>Notes</h2><ul>%s</ul>" % notes if notes else ""))


def write_report_html(run_dir):
    """Render the run directory's files into run_dir/quant_report.html (atomically); returns its path.

    Raises:
      ReportError: the report is missing or malformed, or another JSON file of the run is malformed.
    """
    report, results, analysis = load_run(run_dir)
    path = os.path.join(run_dir, HTML_NAME)
    files.write_atomically(path, render(report, results, analysis))
    return path
