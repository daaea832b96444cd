"""``report.html``: the benchmark's report for a browser, written by every run and by ``cascade bench compare``.

One HTML file beside the images it shows (the run's ``grid_images/`` and ``rate_quality.png``,
linked by relative paths), so it opens from the file system, offline: plain HTML, CSS and a
little vanilla JavaScript, nothing fetched from elsewhere. It holds the header lines every
report states, the summary table (click a heading to sort), the rate–quality plot, and per
grid image the original beside every codec's reconstruction with its per-image metrics, in
panels that zoom (wheel, buttons) and pan (drag) together.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from codec.files import atomic_write

from .plot import rate_quality_plot
from .report import CSV_NAME, GRID_DIR, PLOT_FILE, grid_image_name, header_lines, read_rows

# (heading, codec key or per-image CSV key, digits; None = text)
TABLE_COLUMNS = (("bytes", "bytes_mean", 0), ("bpp", "bpp_mean", 4), ("ratio", "compression_ratio", 1),
                 ("PSNR dB", "psnr", 2), ("SSIM", "ssim", 4), ("MS-SSIM", "ms_ssim", 4), ("LPIPS", "lpips", 4),
                 ("rFID", "rfid", 2), ("enc s/img", "encode_s_per_image", 3), ("dec s/img", "decode_s_per_image", 3))
IMAGE_METRICS = (("bytes", "bytes", 0), ("bpp", "bpp", 4), ("PSNR", "psnr", 2), ("SSIM", "ssim", 4),
                 ("MS-SSIM", "ms_ssim", 4), ("LPIPS", "lpips", 4))


@dataclass
class RunView:
    """One run shown in a report: its ``name`` (empty for a lone run; "A", "B" in a comparison), its summary and
    the folder that holds its ``per_image.csv`` and ``grid_images/``."""

    name: str
    summary: dict[str, Any]
    folder: Path


def _value(v: Any) -> float | None:
    return v["mean"] if isinstance(v, dict) else v


def _fmt(v: Any, digits: int) -> str:
    v = _value(v)
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}"


def _src(target: Path, page_dir: Path) -> str:
    """A relative URL from the page's folder to ``target`` (so the folder can be opened anywhere)."""
    return quote(Path(os.path.relpath(target.absolute(), page_dir.absolute())).as_posix())


def _codec_name(run: RunView, label: str) -> str:
    return f"{run.name}: {label}" if run.name else label


def _encoder(c: dict[str, Any]) -> str:
    e = c.get("encoder")
    if not e:
        return ""
    return f"{e.get('library')} {e.get('version') or '?'}" + (f" ({e['via']})" if e.get("via") else "")


def _table(runs: list[RunView]) -> str:
    head = "".join(f'<th data-sort="num" title="click to sort">{html.escape(h)}</th>' for h, _, _ in TABLE_COLUMNS)
    rows = []
    for run in runs:
        for c in run.summary["codecs"]:
            cells = [f'<td data-v="{html.escape(_codec_name(run, c["title"]))}">'
                     f'{html.escape(_codec_name(run, c["title"]))}</td>']
            for _, key, digits in TABLE_COLUMNS:
                v = _value(c.get(key))
                cells.append(f'<td data-v="{"" if v is None else repr(float(v))}">{_fmt(v, digits)}</td>')
            cells.append(f'<td data-v="{html.escape(_encoder(c))}">{html.escape(_encoder(c))}</td>')
            rows.append("<tr>" + "".join(cells) + "</tr>")
    return ('<table id="summary" class="sortable"><thead><tr><th data-sort="text" title="click to sort">codec</th>'
            + head + '<th data-sort="text" title="click to sort">encoder</th></tr></thead><tbody>\n'
            + "\n".join(rows) + "\n</tbody></table>")


def _grid_rows(run: RunView) -> dict[str, dict[str, Any]]:
    """image id → {index, size, rows by codec label} for the images whose original was kept for the grid."""
    shown: dict[str, dict[str, Any]] = {}
    grid = run.folder / GRID_DIR
    csv_path = run.folder / CSV_NAME
    if not grid.is_dir() or not csv_path.exists():
        return shown
    kept = {p.name for p in grid.iterdir()}
    for row in read_rows(csv_path):
        if grid_image_name(row["image_index"]) not in kept:
            continue
        entry = shown.setdefault(row["image_id"], {"index": row["image_index"], "size": (row["width"], row["height"]),
                                                   "rows": {}})
        entry["rows"][row["codec"]] = row
    return shown


def _panel(src: str | None, title: str, metrics: str) -> str:
    img = f'<img src="{src}" alt="{html.escape(title)}" draggable="false">' if src else '<p class="missing">missing</p>'
    return (f'<div class="panel"><div class="frame">{img}</div><div class="cap"><b>{html.escape(title)}</b>'
            f'<br>{metrics}</div></div>')


def _viewers(runs: list[RunView], page_dir: Path) -> str:
    per_run = [(run, _grid_rows(run)) for run in runs]
    ids: list[str] = []
    for _, shown in per_run:
        ids += [i for i in shown if i not in ids]
    out = []
    for image_id in ids:
        first_run, first = next((r, s[image_id]) for r, s in per_run if image_id in s)
        w, h = first["size"]
        panels = [_panel(_src(first_run.folder / GRID_DIR / grid_image_name(first["index"]), page_dir), "original",
                      f"{w}×{h}")]
        for run, shown in per_run:
            entry = shown.get(image_id)
            for c in run.summary["codecs"]:
                row = entry["rows"].get(c["label"]) if entry else None
                path = run.folder / GRID_DIR / grid_image_name(entry["index"], c["label"]) if entry else None
                metrics = " · ".join(f"{n} {_fmt(row[k], d)}" for n, k, d in IMAGE_METRICS
                                     if row[k] is not None) if row else "not measured"
                panels.append(_panel(_src(path, page_dir) if path and path.exists() else None,
                                     _codec_name(run, c["title"]), metrics))
        out.append(f'<figure class="viewer"><figcaption><b>{html.escape(image_id)}</b> '
                   '<button data-act="in" title="zoom in">+</button><button data-act="out" title="zoom out">−</button>'
                   '<button data-act="reset" title="fit">fit</button> <span class="zoom">100 %</span>'
                   ' <span class="hint">wheel: zoom · drag: pan · all panels follow</span></figcaption>'
                   f'<div class="panels">{"".join(panels)}</div></figure>')
    return "\n".join(out)


def _notes(runs: list[RunView]) -> str:
    items = []
    for run in runs:
        s = run.summary
        prefix = f"{run.name}: " if run.name else ""
        items += [prefix + m["message"] for m in s["metrics"].values() if not m["available"] and m.get("message")]
        items += [prefix + f"{c['label']}: {n}" for c in s["codecs"] for n in c.get("notes", [])]
    if not items:
        return ""
    return "<ul class=\"notes\">" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"


def write_html_report(path: Path, runs: list[RunView], plot: Path | None = None, title: str = "") -> Path:
    """Write the report page to ``path`` for one run (or several, compared) and return ``path``.

    ``plot`` is the rate–quality PNG to show (default: the first run's, when it has one).
    """
    page_dir = path.parent
    if plot is None:
        candidate = runs[0].folder / PLOT_FILE
        plot = candidate if runs[0].summary["files"].get("plot") and candidate.exists() else None
    heads = []
    for run in runs:
        lines = "".join(f"<li>{html.escape(x)}</li>" for x in header_lines(run.summary))
        name = f"<h3>{html.escape(run.name)} = {html.escape(str(run.folder))}</h3>" if run.name else ""
        heads.append(f"{name}<ul class=\"head\">{lines}</ul>")
    plot_html = (f'<h2>Rate–quality</h2><img id="plot" src="{_src(plot, page_dir)}" alt="rate–quality plot">'
                 if plot else "")
    title = title or "cascade bench recon: " + Path(str(runs[0].summary["dataset"]["path"])).name
    page = PAGE.format(title=html.escape(title), heads="".join(heads), table=_table(runs), notes=_notes(runs),
                       plot=plot_html, viewers=_viewers(runs, page_dir), style=STYLE, script=SCRIPT)
    with atomic_write(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def write_compare_report(path: Path, a: RunView, b: RunView) -> Path:
    """The page for ``cascade bench compare``: both runs' tables, one rate–quality plot of both (every codec of A
    and B, its label prefixed with the run's name), and per image both runs' reconstructions side by side."""
    merged = {**b.summary, "codecs": [{**c, "label": f"{run.name}: {c['label']}", "title": f"{run.name}: {c['title']}",
                                       "spec": f"{run.name}: {c.get('spec') or c['label']}"}
                                      for run in (a, b) for c in run.summary["codecs"]]}
    plot_path = path.with_name(path.stem + "_rate_quality.png")
    with atomic_write(plot_path) as tmp:
        drawn = rate_quality_plot(merged, tmp)
    if drawn is None:
        plot_path.unlink(missing_ok=True)
    return write_html_report(path, [a, b], plot_path if drawn is not None else None,
                             f"cascade bench compare: A = {a.folder.name}, B = {b.folder.name}")


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{style}</style></head>
<body><h1>{title}</h1>
{heads}
<h2>Summary</h2>
<p class="hint">Means over images; click a heading to sort.</p>
{table}
{notes}
{plot}
<h2>Images</h2>
{viewers}
<script>{script}</script>
</body></html>
"""

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.2em; margin-top: 1.5em; } h3 { font-size: 1em; margin-bottom: 0; }
ul.head { margin: .3em 0; padding-left: 1.2em; color: #444; }
table.sortable { border-collapse: collapse; }
table.sortable th, table.sortable td { border: 1px solid #ccc; padding: 3px 8px; }
table.sortable td { text-align: right; } table.sortable td:first-child, table.sortable td:last-child { text-align: left; }
table.sortable th { background: #eee; cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " \\25B2"; } th[aria-sort=descending]::after { content: " \\25BC"; }
tbody tr:nth-child(even) { background: #f7f7f7; }
#plot { max-width: 100%; }
.hint { color: #777; font-size: .9em; }
figure.viewer { margin: 1em 0 2em; }
figure.viewer button { min-width: 2.2em; }
.panels { display: flex; flex-wrap: wrap; gap: 8px; margin-top: 6px; }
.panel { width: var(--cell, 256px); }
.frame { width: var(--cell, 256px); height: var(--cell, 256px); overflow: hidden; border: 1px solid #999;
         background: #fff; cursor: grab; touch-action: none; position: relative; }
.frame img { position: absolute; left: 0; top: 0; width: 100%; transform-origin: 0 0; }
.frame.pixelated img { image-rendering: pixelated; }
.cap { font-size: 12px; margin-top: 2px; word-break: break-word; }
.missing { color: #999; padding: 1em; }
"""

SCRIPT = """
(function () {
  // Sort a table by a column: numbers by value (empty cells last), text alphabetically.
  document.querySelectorAll('table.sortable').forEach(function (table) {
    table.querySelectorAll('th').forEach(function (th, col) {
      th.addEventListener('click', function () {
        var asc = th.getAttribute('aria-sort') !== 'ascending';
        table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
        var num = th.dataset.sort === 'num', body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
          if (num) {
            if (x === '' || y === '') { return (x === '') - (y === ''); }
            return asc ? x - y : y - x;
          }
          return asc ? x.localeCompare(y) : y.localeCompare(x);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  // Panels of one figure share one view (scale, offset): zooming or panning any moves all.
  document.querySelectorAll('figure.viewer').forEach(function (fig) {
    var frames = fig.querySelectorAll('.frame'), label = fig.querySelector('.zoom');
    var view = { s: 1, x: 0, y: 0 }, drag = null;
    function size() { return frames[0].clientWidth; }
    function clamp() {
      var w = size(), img = frames[0].querySelector('img');
      var h = img ? img.clientHeight : w;
      view.x = Math.min(0, Math.max(w - w * view.s, view.x));
      view.y = Math.min(0, Math.max(frames[0].clientHeight - h * view.s, view.y));
    }
    function apply() {
      clamp();
      frames.forEach(function (f) {
        var img = f.querySelector('img');
        if (img) { img.style.transform = 'translate(' + view.x + 'px,' + view.y + 'px) scale(' + view.s + ')'; }
        f.classList.toggle('pixelated', view.s > 1.5);
      });
      label.textContent = Math.round(view.s * 100) + ' %';
    }
    function zoomAt(factor, cx, cy) {
      var s = Math.min(64, Math.max(1, view.s * factor));
      view.x = cx - (cx - view.x) * s / view.s; view.y = cy - (cy - view.y) * s / view.s; view.s = s;
      apply();
    }
    fig.querySelectorAll('button').forEach(function (b) {
      b.addEventListener('click', function () {
        var c = size() / 2;
        if (b.dataset.act === 'in') { zoomAt(2, c, c); }
        else if (b.dataset.act === 'out') { zoomAt(0.5, c, c); }
        else { view = { s: 1, x: 0, y: 0 }; apply(); }
      });
    });
    frames.forEach(function (f) {
      f.addEventListener('wheel', function (e) {
        e.preventDefault();
        var r = f.getBoundingClientRect();
        zoomAt(e.deltaY < 0 ? 1.25 : 0.8, e.clientX - r.left, e.clientY - r.top);
      }, { passive: false });
      f.addEventListener('pointerdown', function (e) {
        drag = { x: e.clientX - view.x, y: e.clientY - view.y }; f.setPointerCapture(e.pointerId);
      });
      f.addEventListener('pointermove', function (e) {
        if (drag) { view.x = e.clientX - drag.x; view.y = e.clientY - drag.y; apply(); }
      });
      f.addEventListener('pointerup', function () { drag = null; });
    });
    apply();
  });
})();
"""
