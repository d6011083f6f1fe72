"""Data Docs that open offline, plus a quarantine page.

Great Expectations writes the pages (``tasks/data/contracts.py``); :func:`finish_docs` then

- copies the vendored CDN assets (``tasks/data/docs_vendor.py``) into ``data_docs/static/vendor/``;
- rewrites every page's remote ``<script src>``, ``<link href>``, ``<img src>`` and CSS ``url()`` to those
  copies (relative links, so the folder can move), dropping ``integrity``/``crossorigin`` (a CORS check
  fails on ``file://``; the copies are checked against the same hashes by the tests instead). A remote asset
  with no local copy is an error, so a Great Expectations upgrade cannot quietly put the CDNs back;
- writes ``quarantine.html`` (counts per source and reason for every canonical table, sample rows with their
  detail) and links it from ``index.html``. Hyperlinks (``<a href>``) to the web stay: they load nothing.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc

from tasks.data.docs_vendor import copy_assets, url_map

QUARANTINE_PAGE = "quarantine.html"
SAMPLES_PER_REASON = 5
RAW_CHARS = 600  # of each sample's raw input shown
LINK_MARKER = "align-quarantine-link"

_ASSET_TAG = re.compile(r"<(?:script|link|img)\b[^>]*>", re.IGNORECASE)
_TAG_URL = re.compile(r"""(\s(?:src|href)=)(["'])(https?://[^"']+)\2""", re.IGNORECASE)
_TAG_STATIC = re.compile(r"""(\s(?:src|href)=)(["'])((?:\.\./)*static/[^"']+)\2""", re.IGNORECASE)
_CSS_URL = re.compile(r"""url\((["']?)(https?://[^"')]+)\1\)""", re.IGNORECASE)
_SRI_ATTR = re.compile(r"""\s(?:integrity|crossorigin)(?:=(["'])[^"']*\1)?(?=[\s/>])""", re.IGNORECASE)


class DocsError(RuntimeError):
    """A Data Docs page loads a remote asset we have no local copy of."""


def finish_docs(docs_dir: Path, quarantine: pa.Table, counts: dict) -> None:
    """Make the GX site at `docs_dir` self-contained and add the quarantine page (see the module doc)."""
    docs_dir = Path(docs_dir)
    copy_assets(docs_dir / "static")
    write_quarantine_page(docs_dir, quarantine, counts)
    urls = url_map()
    for page in sorted(docs_dir.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        rewritten = localize(text, page, docs_dir / "static", urls)
        if rewritten != text:
            page.write_text(rewritten, encoding="utf-8")
    link_quarantine(docs_dir / "index.html", quarantine.num_rows)


def localize(text: str, page: Path, static_dir: Path, urls: dict[str, str]) -> str:
    """Remote assets of one page → relative links to the local copies; DocsError naming any unknown one."""
    unknown: list[str] = []

    def static(rel: str) -> str:  # GX links validation pages' favicon one folder short: point at what exists
        if (page.parent / rel).exists() or "static/" not in rel:
            return rel
        return Path(os.path.relpath(static_dir / rel.split("static/", 1)[1], page.parent)).as_posix()

    def local(url: str) -> str:
        target = urls.get(url.split("?", 1)[0].split("#", 1)[0])
        if target is None:
            unknown.append(url)
            return url
        rel = os.path.relpath(static_dir / target, page.parent)
        return quote(Path(rel).as_posix(), safe="/@.-_~")

    def tag(m: re.Match) -> str:
        t = m.group(0)
        if not _TAG_URL.search(t):
            return _TAG_STATIC.sub(lambda s: s.group(1) + s.group(2) + static(s.group(3)) + s.group(2), t)
        t = _TAG_URL.sub(lambda u: f"{u.group(1)}{u.group(2)}{local(u.group(3))}{u.group(2)}", t)
        return _SRI_ATTR.sub("", t)

    text = _ASSET_TAG.sub(tag, text)
    text = _CSS_URL.sub(lambda m: f"url({m.group(1)}{local(m.group(2))}{m.group(1)})", text)
    if unknown:
        raise DocsError(
            f"{page}: remote asset(s) with no local copy: {', '.join(sorted(set(unknown)))}; "
            "add them to tasks/data/docs_assets/assets.json and run `make docs-assets`"
        )
    return text


def link_quarantine(index: Path, rows: int) -> None:
    """A line under the site title of index.html: how many rows were dropped, linking the quarantine page."""
    text = index.read_text(encoding="utf-8")
    if LINK_MARKER in text:
        return
    block = (
        f'<div class="col-12 {LINK_MARKER}"><div class="alert alert-warning">'
        f'<i class="fas fa-filter"></i> <a href="{QUARANTINE_PAGE}"><strong>Quarantine</strong></a>: '
        f"{rows} row(s) kept out of the data, with the reason and detail of each.</div></div>\n"
    )
    anchor = text.find('<div id="section-1-content-block-2"')
    if anchor < 0:  # another GX layout: right after <body>
        body = re.search(r"<body[^>]*>", text)
        if body is None:
            raise DocsError(f"{index}: no <body> to link {QUARANTINE_PAGE} from")
        anchor = body.end()
    index.write_text(text[:anchor] + block + text[anchor:], encoding="utf-8")


# ------------------------------------------------------------------------------------- the quarantine page


def write_quarantine_page(docs_dir: Path, quarantine: pa.Table, counts: dict) -> Path:
    """quarantine.html: rows per source and its table (read / accepted / quarantined), counts per table, source
    and reason, and up to SAMPLES_PER_REASON rows of each (source, reason) with source_row, detail and raw."""
    groups = _reason_counts(quarantine)
    bootstrap = url_map()["https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css"]
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Quarantine: {quarantine.num_rows} rows</title>",
        f'<link rel="stylesheet" href="static/{bootstrap}">',
        '<link rel="shortcut icon" href="static/images/favicon.ico" type="image/x-icon">',
        "<style>pre.raw{max-height:12em;overflow:auto;white-space:pre-wrap;font-size:.8em;margin:0}"
        "td.detail{max-width:32em}</style>",
        '</head><body><div class="container-fluid p-4">',
        '<p><a href="index.html">&larr; Data Docs</a></p>',
        f'<h1 class="h3">Quarantine <span class="badge badge-secondary">{quarantine.num_rows} rows</span></h1>',
        "<p>Rows kept out of the data, each with its reason: by the source adapters (unreadable, wrong shape), by "
        "cleaning (filters, duplicates, decontamination) or, for generated data, by its checks. Every row read is "
        "accepted or here.</p>",
        _sources_table(counts, quarantine),
        _reasons_table(groups, _tables_of(quarantine, counts)),
    ]
    parts += [_samples(quarantine, source, reason, n) for source, reason, n in groups]
    parts.append("</div></body></html>\n")
    path = Path(docs_dir) / QUARANTINE_PAGE
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _reason_counts(quarantine: pa.Table) -> list[tuple[str, str, int]]:
    """(source, reason, rows), by source then most rows first."""
    if quarantine.num_rows == 0:
        return []
    grouped = quarantine.group_by(["source", "reason"]).aggregate([([], "count_all")]).to_pylist()
    rows = [(g["source"], g["reason"], g["count_all"]) for g in grouped]
    return sorted(rows, key=lambda r: (str(r[0]), -r[2], str(r[1])))


def _tables_of(quarantine: pa.Table, counts: dict) -> dict[str, str]:
    """source → the canonical table it feeds (from the counts, else its quarantine rows)."""
    found = {s: c["table"] for s, c in counts.get("per_source", {}).items() if "table" in c}
    if "table" in quarantine.column_names and quarantine.num_rows:
        pairs = quarantine.select(["source", "table"]).group_by(["source", "table"]).aggregate([]).to_pylist()
        found = {p["source"]: p["table"] for p in pairs if p["table"]} | found
    return found


def _anchor(source: str, reason: str) -> str:
    return "q-" + re.sub(r"[^A-Za-z0-9_-]+", "-", f"{source}-{reason}")


def _sources_table(counts: dict, quarantine: pa.Table) -> str:
    per_source = dict(counts.get("per_source", {}))
    vc = pc.value_counts(quarantine["source"]) if quarantine.num_rows else None
    present = dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())) if vc else {}
    for source in present.keys() - per_source.keys():
        per_source[source] = {"quarantined": present[source]}
    lines, tables = [], _tables_of(quarantine, counts)
    for source in sorted(per_source, key=lambda s: (tables.get(s) or "", s)):
        c = per_source[source]
        read, quarantined = c.get("read"), c.get("quarantined", present.get(source, 0))
        share = f"{quarantined / read:.1%}" if read else "-"
        cells = [source, read, c.get("accepted"), quarantined, share, tables.get(source)]
        lines.append("<tr>" + "".join(f"<td>{_esc('-' if v is None else v)}</td>" for v in cells) + "</tr>")
    columns = ("source", "read", "accepted", "quarantined", "share quarantined", "table")
    head = "".join(f"<th>{h}</th>" for h in columns)
    return (
        '<h2 class="h5 mt-4">Per source</h2><table class="table table-sm table-striped w-auto" id="sources">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"
    )


def _reasons_table(groups: list[tuple[str, str, int]], tables: dict[str, str]) -> str:
    lines = [
        f'<tr><td>{_esc(s)}</td><td><a href="#{_anchor(s, r)}">{_esc(r)}</a></td><td>{n}</td>'
        f"<td>{_esc(tables.get(s, '-'))}</td></tr>"
        for s, r, n in groups
    ]
    body = "".join(lines) or '<tr><td colspan="4">no row was quarantined</td></tr>'
    return (
        '<h2 class="h5 mt-4">Per source and reason</h2><table class="table table-sm table-striped w-auto" '
        'id="reasons"><thead><tr><th>source</th><th>reason</th><th>rows</th><th>table</th></tr></thead>'
        f"<tbody>{body}</tbody></table>"
    )


def _samples(quarantine: pa.Table, source: str, reason: str, n: int) -> str:
    """The first SAMPLES_PER_REASON rows of one (source, reason), raw cut to RAW_CHARS."""
    mask = pc.and_(pc.equal(quarantine["source"], source), pc.equal(quarantine["reason"], reason))
    picked = quarantine.filter(mask).slice(0, SAMPLES_PER_REASON)
    raw = pc.utf8_slice_codeunits(picked["raw"], 0, RAW_CHARS).to_pylist()
    lengths = pc.utf8_length(picked["raw"]).to_pylist()
    rows = []
    for row, text, length in zip(picked.select(["source_row", "detail"]).to_pylist(), raw, lengths):
        more = f" … ({length} chars)" if length > RAW_CHARS else ""
        rows.append(
            f'<tr><td>{row["source_row"]}</td><td class="detail">{_esc(row["detail"])}</td>'
            f'<td><pre class="raw">{_esc(text)}{more}</pre></td></tr>'
        )
    shown = f"first {len(rows)} of {n}" if n > len(rows) else f"all {n}"
    return (
        f'<h3 class="h6 mt-4" id="{_anchor(source, reason)}">{_esc(source)} · {_esc(reason)} '
        f'<small class="text-muted">({shown})</small></h3>'
        '<table class="table table-sm table-bordered samples"><thead><tr><th>source_row</th><th>detail</th>'
        f"<th>raw</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _esc(value) -> str:
    return html.escape(str(value), quote=True)
