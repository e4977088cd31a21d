"""A self-contained HTML report: sections of image grids and tables (images inlined as PNG data URIs)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
h1{margin-bottom:0}.sub{color:#666}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;width:112px;font-size:11px;text-align:center}
img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ddd}
.ok{color:#16803c}.bad{color:#b91c1c}"""


def data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def grid(images, captions=None, marks=None) -> str:
    """Images with captions; marks (True/False/None per image) colour the caption green or red."""
    cells = []
    for i, im in enumerate(images):
        cap = html.escape(captions[i]) if captions else ""
        cls = "" if not marks or marks[i] is None else (" class='ok'" if marks[i] else " class='bad'")
        cells.append(f"<figure><img src='{data_uri(im)}'><figcaption{cls}>{cap}</figcaption></figure>")
    return "<div class='grid'>" + "".join(cells) + "</div>"


def sheet(rows, row_labels: list[str], col_labels: list[str], scale: int = 3):
    """A labelled PNG grid (PIL image): rows of images, each cell the first image's size times `scale`."""
    from PIL import Image, ImageDraw
    s = rows[0][0].width * scale
    left, top = 90, 18
    out = Image.new("RGB", (left + s * len(col_labels), top + s * len(rows)), "white")
    d = ImageDraw.Draw(out)
    for j, c in enumerate(col_labels):
        d.text((left + j * s + 4, 3), c, fill="black")
    for i, (row, label) in enumerate(zip(rows, row_labels)):
        d.text((4, top + i * s + s // 2 - 6), label, fill="black")
        for j, im in enumerate(row):
            out.paste(im.resize((s, s), Image.NEAREST), (left + j * s, top + i * s))
    return out


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(path: Path, title: str, sections: list[tuple[str, str]], subtitle: str = "") -> Path:
    """sections: (heading, html body) pairs. Written atomically."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='sub'>{html.escape(subtitle)}</p>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    parts.append("</body></html>")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)
    return path
