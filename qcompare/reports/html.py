"""``qcompare report RUN --format html``: the whole report in one self-contained file to send a
colleague — the tables with their intervals and footnotes, the figures (embedded PNGs), and a
section per cell: its settings, provenance, cost, loss curve and the checks it passed."""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from qcompare.reports.tables import (RERUN, cell_notes, footnotes, note_groups, notes_lines, report_tables,
                             summarize)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1400px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; } h3 { font-size: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.85em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
tr.teacher td { font-weight: 600; } tr.ptq td { background: #fff5f5; }
.note { color: #555; font-size: 0.85em; max-width: 110ch; }
.failed { color: #b00; } .passed { color: #070; }
details { margin: 0.4em 0; border: 1px solid #ddd; border-radius: 4px; padding: 0.3em 0.8em; }
summary { cursor: pointer; font-weight: 600; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; } h2 + h3 + img, h3 + img { max-width: 760px; }
.wide { overflow-x: auto; max-width: 100%; }
/* a wide table scrolls sideways under its configuration column, which stays put */
.wide td:first-child, .wide th:first-child { position: sticky; left: 0; z-index: 1; background: #fff;
  white-space: normal; min-width: 12em; max-width: 30em; box-shadow: inset -1px 0 #ddd; }
.wide tr.ptq td:first-child { background: #fff5f5; }
"""
# The columns a reader compares rows on, first in a table (before the tasks), so that a laptop screen shows them.
KEY_COLUMNS = ("configuration", "seeds", "± over", "average", "Δ teacher", "Δ PTQ", "recovered")


def _e(value) -> str:
    return html.escape(str(value))


def _png(path_or_figure) -> str:
    data = Path(path_or_figure).read_bytes() if isinstance(path_or_figure, (str, Path)) else path_or_figure
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(cols, rows, classes=None) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>")
    return f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def _key_columns_first(cols: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    order = [cols.index(c) for c in KEY_COLUMNS if c in cols] + [i for i, c in enumerate(cols) if c not in KEY_COLUMNS]
    return [cols[i] for i in order], [[r[i] for i in order] for r in rows]


def _pairs(d: dict) -> str:
    return _table(["", ""], [[k, _number(v)] for k, v in d.items()])


def _number(v) -> str:
    """A recorded value as a reader takes it in: 4 significant digits, thousands grouped."""
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:,}" if isinstance(v, int) else f"{v:,.4g}"


def _loss_curve(rows: list[dict], distiller: str) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
    if len(points) < 2:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 2.4))
    ax.plot(*zip(*points))
    ax.set_xlabel("step")
    ax.set_ylabel(f"{distiller} loss")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _checks(checks: dict) -> str:
    rows = []
    for name, check in checks.items():
        if not isinstance(check, dict):
            continue
        passed = check.get("passed")
        verdict = "passed" if passed else ("failed" if passed is False else "—")
        detail = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items()
                           if k != "passed" and not isinstance(v, (dict, list)))
        rows.append(f'<tr><td>{_e(name)}</td><td class="{verdict}">{verdict}</td><td>{_e(detail)}</td></tr>')
    if not rows:
        return "<p class='note'>no checks recorded</p>"
    return "<table><thead><tr><th>check</th><th></th><th>measured</th></tr></thead><tbody>" + "".join(rows) + \
        "</tbody></table>"


def _cell_section(store, record) -> str:
    files = store.cell(record.id)
    status = "done" if record.done else "failed"
    parts = [f'<details id="cell-{_e(record.id)}"><summary>{_e(record.label)} — '
             f'<span class="{"passed" if record.done else "failed"}">{status}</span> <code>{_e(record.id)}</code>'
             "</summary>"]
    if record.error:
        again = RERUN.get(record.rerun_helps)
        parts.append(f'<p class="failed">{_e(record.error)}' + (f" ({_e(again)})" if again else "") + "</p>")
    if record.metrics:
        parts.append("<h3>metrics</h3>" + _table(["metric", "value", "stderr"],
                                                  [[k, f"{v:.4f}", "" if record.stderr.get(k) is None else
                                                    f"{record.stderr[k]:.4f}"] for k, v in sorted(record.metrics.items())]))
    parts.append("<h3>checks</h3>" + _checks(record.checks))
    distiller = record.settings.distiller.name if record.settings.distiller else ""
    curve = _loss_curve(files.read_train_log(), distiller) if files.train_log.is_file() else None
    if curve:
        parts.append("<h3>loss curve</h3>" + _png(curve))
    if record.size:
        parts.append("<h3>size</h3>" + _pairs(record.size))
    if record.cost:
        cost = {k: v for k, v in record.cost.items() if not isinstance(v, (dict, list))}
        parts.append("<h3>cost</h3>" + _pairs(cost))
        if record.estimate:
            parts.append("<p class='note'>estimated before it ran: " + _e(json.dumps(record.estimate)) + "</p>")
    parts.append("<h3>settings</h3><pre>" + _e(json.dumps(record.settings.model_dump(mode="json"), indent=2)) + "</pre>")
    parts.append("<h3>provenance</h3><pre>" + _e(json.dumps({"plugins": record.plugins, **record.provenance},
                                                            indent=2, default=str)) + "</pre>")
    if record.notes:
        parts.append("<h3>notes</h3><pre>" + _e(json.dumps(record.notes, indent=2)) + "</pre>")
    if files.traceback.is_file():
        parts.append("<h3>traceback</h3><pre>" + _e(files.traceback.read_text()[-6000:]) + "</pre>")
    return "".join(parts) + "</details>"


def write_html(root: Path, out: Path, metric: str = "average") -> Path:
    """Write the report of run folder ``root`` as one HTML file at ``out``; return its path."""
    from qcompare.version import __version__
    from qcompare.reports.figures import write_figures
    from qcompare.results.frame import load_run
    from qcompare.results.store import RunStore

    store = RunStore(root)
    records = list(store.records())
    every = load_run(root, include_failed=True)
    df = every[every["status"] == "done"].reset_index(drop=True) if not every.empty else every
    body = [f"<h1>qcompare report: {_e(root.name)}</h1>",
            f"<p class='note'>{_e(root.resolve())} · written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by qcompare "
            f"{_e(__version__)} · {len(df)} finished cells of {len(every)}</p>"]
    for head, some in note_groups(cell_notes(root)):
        items = "".join(f"<li><a href='#cell-{_e(n.id)}'><code>{_e(n.id)}</code></a> {_e(n.label)}: {_e(n.why)}</li>"
                        for n in some)
        body.append(f"<p class='{'note' if some[0].kind == 'model not saved' else 'failed'}'>{_e(head)}:</p><ul>{items}</ul>")
    if df.empty:
        body.append("<p>no finished cells</p>")
    else:
        summary, metrics = summarize(df)
        body.append("<h2>Tables</h2>")
        for title, cols, rows, kinds in report_tables(summary, metrics, root):
            body.append(f"<h3>{_e(title)}</h3>" + _table(*_key_columns_first(cols, rows), kinds))
        body += [f"<p class='note'>{_e(line)}</p>" for line in footnotes(df, root)]
        body += [f"<p class='note'>{_e(line)}</p>" for line in notes_lines(df)]
        with tempfile.TemporaryDirectory() as folder:
            figures = write_figures(root, folder, metric)
            body.append("<h2>Figures</h2>")
            body += [f"<h3>{_e(p.stem.replace('_', ' '))}</h3>" + _png(p) for p in figures]
            if not figures:
                body.append("<p>" + _e("No figures: only the teacher finished, and every figure compares other "
                                       "configurations with it." if (df["quantizer"] == "teacher").all() else
                                       f"No figures: no finished cell has {metric!r}.") + "</p>")
    body.append(f"<h2>Cells ({len(records)})</h2>")
    body += [_cell_section(store, r) for r in records]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>qcompare: {_e(root.name)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
