"""`bench publish`: the static leaderboard site from a real (tiny) run, rendered in headless Chromium.

Two tiny cards (tests/tiny_cards.py) are run once for the module in one pytest process (one table with dense +
SOMP at one ratio, one dense-only table whose title is full of HTML), then `bench publish` builds the site and
the results folder. The browser test reads each page's DOM as Chromium parsed it (--dump-dom) and takes a
screenshot (--screenshot): every table is linked from the index, every page has its table rows and a plot whose
file is a PNG, the screenshot is a PNG of the requested size, not blank, and shows the plot's colours.
Without Chromium the browser test is skipped, except under CI=true, where it fails (.ci/run installs it).
"""
from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from bench.errors import BenchError
from bench.publish import MARKER, markdown_to_html
from tests.tiny_cards import tiny_env, write_tiny_card

HOSTILE_TITLE = 'Tiny <b>B</b> & "quoted" <script>alert(1)</script>'
WINDOW = (1280, 1800)


# ---------------------------------------------------------------------------------------------
# fixtures: one tiny run of two tables, one publish

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("publish")
    env = tiny_env(tmp, methods=("dense", "somp"), ratios=slice(0, 1), finetune_epochs=1)
    b = write_tiny_card(tmp / "cards", methods=("dense",), ratios=slice(0, 1), finetune_epochs=1, name="tiny_deit_b")
    card = yaml.safe_load(b.read_text())
    card["title"] = HOSTILE_TITLE
    b.write_text(yaml.safe_dump(card, sort_keys=False))
    # both cards in one pytest process (the suite's cells are pytest items; `bench run` takes one table)
    cards = tmp / "cards"
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "bench.pytest_plugin", "-p", "no:cacheprovider",
                        "--noconftest", "-q", "--rootdir", str(cards), str(cards), "--bench-quiet",
                        "--bench-device", "cpu"], env=env, capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, env


@pytest.fixture(scope="module")
def site(tiny_run):
    from bench.cli import main

    tmp, env = tiny_run
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_TABLES", env["BENCH_TABLES"])
        rc = main(["publish", "--output", env["BENCH_OUTPUT"], "--site", str(tmp / "site"),
                   "--results", str(tmp / "results")])
    assert rc == 0
    return tmp / "site", tmp / "results"


# ---------------------------------------------------------------------------------------------
# the site's files

def test_site_files_and_results(site):
    folder, results = site
    assert (folder / "index.html").is_file() and (folder / MARKER).is_file()
    for table in ("tiny_deit", "tiny_deit_b"):
        page = folder / table / "index.html"
        assert page.is_file()
        csvs = list((folder / table).glob(f"{table}-micro-*.csv"))
        assert len(csvs) == 1 and csvs[0].read_text().startswith("table_id,table_version,profile,")
        assert (folder / table / f"{table}-micro.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (folder / "tiny_deit_b" / "index.html").read_text()
    assert "<script" not in text and "<b>B</b>" not in text
    assert "Tiny &lt;b&gt;B&lt;/b&gt; &amp; &quot;quoted&quot; &lt;script&gt;" in text

    prov = json.loads((results / "PROVENANCE.json").read_text())
    for key in ("command", "date_utc", "commit", "machine", "versions", "files"):
        assert key in prov, key
    assert prov["command"].startswith("python -m bench publish --output ")
    assert {"platform", "cpu", "device"} <= set(prov["machine"])
    assert prov["versions"]["torch"] and prov["versions"]["timm"]
    assert sorted(f["table"] for f in prov["files"]) == ["tiny_deit", "tiny_deit_b"]
    for f in prov["files"]:
        assert (results / f["csv"]).read_bytes() == (folder / f["table"] / f["csv"]).read_bytes()
        assert (results / f["png"]).is_file() and f["records"] == (2 if f["table"] == "tiny_deit" else 1)


def test_publish_refuses_a_foreign_folder_and_replaces_its_own(site, tmp_path, monkeypatch):
    from bench.publish import publish

    base = site[0].parent
    out = base / "out"
    monkeypatch.setenv("BENCH_TABLES", str(base / "cards"))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(BenchError, match="not empty and was not written by `bench publish`"):
        publish(out, foreign, tables=["tiny_deit_b"])
    assert (foreign / "notes.txt").read_text() == "keep me"
    own = tmp_path / "own"
    publish(out, own, tables=["tiny_deit_b"])
    (own / "stale.html").write_text("old")
    res = publish(out, own, tables=["tiny_deit_b"])
    assert not (own / "stale.html").exists() and [p.parent.name for p in res["pages"]] == ["tiny_deit_b"]
    with pytest.raises(BenchError, match="--tables: no records of nope"):
        publish(out, own, tables=["nope"])
    # --results: a CSV of the same table and profile from another device is replaced, other tables' files stay
    results = tmp_path / "results"
    results.mkdir()
    (results / "tiny_deit_b-micro-fp32-other_cpu.csv").write_text("old")
    (results / "upop_deit-micro-fp32-amd_epyc.csv").write_text("another table")
    publish(out, own, results=results, tables=["tiny_deit_b"], command="python -m bench publish ...")
    prov = json.loads((results / "PROVENANCE.json").read_text())
    assert prov["removed_csvs"] == ["tiny_deit_b-micro-fp32-other_cpu.csv"]
    assert prov["other_csvs_not_written_by_this_publish"] == ["upop_deit-micro-fp32-amd_epyc.csv"]
    assert sorted(p.name for p in results.glob("*.csv")) == sorted([prov["files"][0]["csv"],
                                                                     "upop_deit-micro-fp32-amd_epyc.csv"])


def test_markdown_to_html_escapes_and_keeps_the_table():
    md = ("**T <i> [x v1]**\n\n| Method | top1 | Status |\n| --- | ---: | --- |\n"
          "| a\\|b | 1.0 | FAILED: top1 <1> vs 2 |\n\nhead & tail\n\n- Note: <script>x</script>\n")
    out = markdown_to_html(md)
    assert "<h3>T &lt;i&gt; [x v1]</h3>" in out
    assert "<th>Method</th><th>top1</th><th>Status</th>" in out
    assert '<td>a|b</td><td class="num">1.0</td><td class="fail">FAILED: top1 &lt;1&gt; vs 2</td>' in out
    assert "<p>head &amp; tail</p>" in out and "<li>Note: &lt;script&gt;x&lt;/script&gt;</li>" in out
    assert "<script>" not in out and "<i>" not in out


# ---------------------------------------------------------------------------------------------
# in a real browser

def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    msg = "headless Chromium not found (Debian: apt-get install chromium; .ci/run installs it)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg)
    pytest.skip(msg)


def _browser(exe, profile_dir, *args, timeout=120):
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile_dir}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


class _DOM(html.parser.HTMLParser):
    """The tables (rows of cell texts), images and links of a page as Chromium serialized it."""

    def __init__(self):
        super().__init__()
        self.tables, self.imgs, self.links, self.scripts = [], [], [], 0
        self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append({"id": a.get("id"), "rows": []})
        elif tag == "tr" and self.tables:
            self._row = []
            self.tables[-1]["rows"].append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "a" and a.get("href"):
            self.links.append(a)
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _dom(exe, profile_dir, page: Path) -> _DOM:
    d = _DOM()
    d.feed(_browser(exe, profile_dir, "--dump-dom", page.as_uri()))
    return d


def _local(page: Path, ref: str) -> Path:
    return (page.parent / unquote(urlsplit(ref).path)).resolve()


def _check_png(path: Path, size=None):
    from PIL import Image, ImageStat

    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        assert im.format == "PNG"
        if size:
            assert im.size == size, (im.size, size)
        rgb = im.convert("RGB")
        spread = ImageStat.Stat(rgb.convert("L")).stddev[0]
        assert spread > 5, f"{path}: nearly uniform image (stddev {spread:.1f})"
        return rgb


def test_site_in_headless_chromium(site, tmp_path):
    exe = _chromium()
    folder, _ = site
    prof = tmp_path / "chromium-profile"
    index = folder / "index.html"

    dom = _dom(exe, prof, index)
    assert dom.scripts == 0
    listing = next(t for t in dom.tables if t["id"] == "tables")
    header, rows = listing["rows"][0], listing["rows"][1:]
    assert header[:4] == ["Table", "Title", "Card version", "Profile"]
    assert sorted(r[0] for r in rows) == ["tiny_deit", "tiny_deit_b"]
    assert HOSTILE_TITLE in [r[1] for r in rows]       # shown as text, not parsed as markup
    pages = {}
    for a in dom.links:
        if a.get("class") == "table-link":
            pages[a["href"].split("/")[0]] = _local(index, a["href"])
    assert sorted(pages) == ["tiny_deit", "tiny_deit_b"]

    expected_rows = {"tiny_deit": ["dense", "somp"], "tiny_deit_b": ["dense"]}
    for table, page in pages.items():
        assert page.is_file(), page
        d = _dom(exe, prof, page)
        assert d.scripts == 0
        cells = next(t for t in d.tables if t["rows"] and t["rows"][0][:2] == ["Method", "Ratio"])
        head = cells["rows"][0]
        assert {"top1", "Params M", "GFLOPs", "Status"} <= set(head)
        assert [r[0] for r in cells["rows"][1:]] == expected_rows[table]
        assert all(r[head.index("Status")] for r in cells["rows"][1:])
        plots = [i for i in d.imgs if i.get("class") == "plot"]
        assert len(plots) == 1 and plots[0].get("alt")
        _check_png(_local(page, plots[0]["src"]))
        csv_links = [a for a in d.links if a.get("class") == "csv"]
        assert len(csv_links) == 1
        assert _local(page, csv_links[0]["href"]).read_text().startswith("table_id,")

    shot = tmp_path / "tiny_deit.png"
    _browser(exe, prof, f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", pages["tiny_deit"].as_uri())
    rgb = _check_png(shot, WINDOW)
    # the plot is on screen: matplotlib's first colour (SOMP's line, #1f77b4) is nowhere else on the page
    import numpy as np
    px = np.asarray(rgb, dtype=np.int16)
    blue = int((np.abs(px - np.array([31, 119, 180])) < 25).all(axis=-1).sum())
    assert blue > 200, f"the plot's blue appears in {blue} pixels only"
    shot_index = tmp_path / "index.png"
    _browser(exe, prof, f"--screenshot={shot_index}", "--window-size=1280,600", index.as_uri())
    _check_png(shot_index, (1280, 600))
    keep = os.environ.get("BENCH_KEEP_SCREENSHOTS")   # to look at them: BENCH_KEEP_SCREENSHOTS=DIR
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
        shutil.copy(shot_index, Path(keep) / shot_index.name)
