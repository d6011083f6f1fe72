"""Data Docs open offline: every page loads only the assets shipped in the version folder (checked in a real
headless Chromium with the network blocked), the index lists every validation result, and the quarantine
page shows why rows were dropped."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pytest
from browser import Browser, find_browser

from schemas.preference import QUARANTINE_SCHEMA
from tasks.data.docs import QUARANTINE_PAGE, DocsError, localize, write_quarantine_page
from tasks.data.docs_vendor import ASSETS_DIR, load_lock, sri, url_map, verify

REMOTE_ASSET = re.compile(r"""<(?:script|link|img)\b[^>]*\s(?:src|href)=["'](https?://[^"']+)""", re.IGNORECASE)
BOOTSTRAP_FONT = "-apple-system"  # Bootstrap 4's body font stack starts with it; a bare page uses the default


@pytest.fixture(scope="module")
def browser():
    if find_browser() is None:
        why = "no headless Chromium: `make install` installs Debian's chromium with apt where it runs as root"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    with Browser() as b:
        yield b


def _pages(docs: Path) -> list[Path]:
    return sorted(docs.rglob("*.html"))


def test_data_docs_index_lists_every_validation_result_offline_in_chromium(tiny_dataset, browser):
    docs = tiny_dataset / "data_docs"
    browser.open((docs / "index.html").as_uri())
    assert browser.blocked == [] and browser.errors == [], (browser.blocked, browser.errors)
    # 12 results: bootstrap-table pages them by 10; one page of 100 shows every row to read
    assert browser.evaluate("($('#Validation-Results table').bootstrapTable('refreshOptions', {pageSize: 100}), 1)")
    hrefs = browser.evaluate(
        "Array.from(document.querySelectorAll('#Validation-Results table tbody tr')).map(tr => tr.dataset.href)"
    )
    on_disk = {p.relative_to(docs).as_posix() for p in (docs / "validations").rglob("*.html")}
    views = {v for v in ("rows", "splits", "sources", "quarantine")}
    tables = ("preference", "sft", "unpaired")  # one site: every canonical table's suite
    assert len(on_disk) == len(views) * len(tables) and set(hrefs) == on_disk
    suites = browser.evaluate(
        "Array.from(document.querySelectorAll('#Validation-Results tbody td a')).map(a => a.textContent.trim())"
    )
    assert sorted(suites) == sorted(f"{t}.{v}" for t in tables for v in views)
    assert BOOTSTRAP_FONT in browser.evaluate("getComputedStyle(document.body).fontFamily")
    assert browser.evaluate("document.fonts.check('900 16px \"Font Awesome 6 Free\"')") is True
    link = browser.evaluate(f"document.querySelector('a[href=\"{QUARANTINE_PAGE}\"]').href")
    assert link == (docs / QUARANTINE_PAGE).as_uri()


def test_data_docs_every_page_styled_without_a_remote_request(tiny_dataset, browser):
    docs = tiny_dataset / "data_docs"
    pages = _pages(docs)
    assert len(pages) >= 10  # index, quarantine, 4 expectation suites, 4 validation results
    for page in pages:
        assert not REMOTE_ASSET.findall(page.read_text(encoding="utf-8")), page
        browser.open(page.as_uri(), settle=0.2)
        assert browser.blocked == [] and browser.errors == [], (page, browser.blocked, browser.errors)
        assert BOOTSTRAP_FONT in browser.evaluate("getComputedStyle(document.body).fontFamily"), page
        assert all(u.startswith(("file:", "data:")) for u in browser.requests), page


def test_quarantine_page_counts_per_source_and_reason_with_sample_details(tiny_dataset, browser):
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    browser.open((tiny_dataset / "data_docs" / QUARANTINE_PAGE).as_uri(), settle=0.1)
    assert browser.blocked == [] and browser.errors == []
    cells = "Array.from(document.querySelectorAll('#{} tbody tr')).map(r => Array.from(r.cells, c => c.innerText))"
    per_source = {r[0]: [int(x) for x in r[1:4]] for r in browser.evaluate(cells.format("sources"))}
    assert per_source == {
        s: [c["read"], c["accepted"], c["quarantined"]] for s, c in manifest["counts"]["per_source"].items()
    }
    found = browser.evaluate(cells.format("reasons"))
    reasons = {(s, r): int(n) for s, r, n, _ in found}
    expected = {(s, r): n for s, per in manifest["counts"]["quarantine_reasons"].items() for r, n in per.items()}
    assert reasons == expected and len(expected) >= 5
    assert {(s, t) for s, _, _, t in found} == {(s, manifest["counts"]["per_source"][s]["table"]) for s, _ in expected}
    text = browser.evaluate("document.body.innerText")
    assert "hh-rlhf.jsonl:180: chosen: no '\\n\\nHuman: ' marker" in text  # a sample row's detail
    assert BOOTSTRAP_FONT in browser.evaluate("getComputedStyle(document.body).fontFamily")


def test_quarantine_page_escapes_rows_and_shows_at_most_five_per_reason(tmp_path):
    rows = [
        {"source": "s", "source_row": i, "reason": "tie", "detail": f"<b>tie {i}</b>", "raw": "x" * 700}
        for i in range(7)
    ]
    page = write_quarantine_page(tmp_path, pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA), {})
    text = page.read_text(encoding="utf-8")
    assert "&lt;b&gt;tie 0&lt;/b&gt;" in text and "<b>tie" not in text
    assert "tie 4" in text and "tie 5" not in text and "first 5 of 7" in text
    assert "x" * 601 not in text and "(700 chars)" in text


def test_localize_rewrites_cdn_links_relative_and_drops_integrity(tmp_path):
    page = tmp_path / "validations" / "a" / "b.html"
    html = (
        '<script src="https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js" '
        'integrity="sha384-x" crossorigin="anonymous"></script>'
        "<style>a{background:url('https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"
        'full_logo_dark.png\')}</style><a href="https://greatexpectations.io">GX</a>'
    )
    out = localize(html, page, tmp_path / "static", url_map())
    assert '<script src="../../static/vendor/bootstrap@4.3.1/dist/js/bootstrap.min.js"></script>' in out
    assert "url('../../static/images/logo-long.png')" in out
    assert '<a href="https://greatexpectations.io">' in out  # a hyperlink loads nothing: kept


def test_localize_remote_asset_without_local_copy_names_it(tmp_path):
    with pytest.raises(DocsError, match=r"https://cdn\.example\.org/x\.js.*assets\.json"):
        localize('<script src="https://cdn.example.org/x.js"></script>', tmp_path / "i.html", tmp_path, url_map())


def test_vendored_assets_match_lock_and_the_integrity_gx_pins():
    assert verify() == []
    import great_expectations

    templates = Path(great_expectations.__file__).parent / "render" / "view" / "templates"
    text = "\n".join(p.read_text(encoding="utf-8") for p in templates.rglob("*.j2"))
    remote = set(REMOTE_ASSET.findall(text))
    assert len(remote) >= 16 and remote <= url_map().keys()  # every CDN asset GX's templates load has a copy
    pinned = re.findall(r"""src="(https://[^"]+)"\s+integrity="([^"]+)\"""", text)
    assert pinned
    for url, integrity in pinned:
        assert sri(ASSETS_DIR / url_map()[url].removeprefix("vendor/")) == integrity, url
    packages = load_lock()["packages"]
    assert all(meta["integrity"].startswith("sha512-") for meta in packages.values())
