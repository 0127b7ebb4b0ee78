"""`python -m bench publish`: a static leaderboard site (and optionally the published CSVs) from an output folder.

    <site>/index.html                       every table found under --output: title, profiles, cells, status counts
    <site>/<table>/index.html               per profile: the paper-style table (HTML), its plot (PNG), the CSV to
                                            download, the relations the paper states, and provenance
    <site>/<table>/<csv>, <table>-<profile>.png
    <site>/.bench-site                      marker: a folder with it is ours to replace on the next publish

With --results DIR the leaderboard CSV and the plot of every (table, profile) are also written to DIR (an older CSV of
the same table and profile under another precision or device name is removed), with one DIR/PROVENANCE.json (the
commit, date, machine, versions and command of this publish, and per file the commits, dates and machines of the
records it was built from).

The records of a (table, profile) are the ones `bench report` uses (the latest of every cell of the card's current
version); the table is `report.render_table(..., "md")` turned into HTML, so site, terminal and Markdown agree.
Plain HTML with an inline style sheet, no script; every text taken from a card or a record is escaped.
"""
from __future__ import annotations

import html
import json
import re
import shutil
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from bench.atomic import atomic_write
from bench.errors import BenchError

MARKER = ".bench-site"
PROVENANCE_FILE = "PROVENANCE.json"
STATUS_CLASS = {"PASSED": "pass", "FAILED": "fail", "ERROR": "error", "NO-REF": "noref"}
VERSION_KEYS = ("torch", "torchvision", "timm", "transformers", "open_clip_torch", "fvcore", "numpy", "pandas")

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:2rem auto;max-width:1400px;
padding:0 1rem;color:#1b1b1b;background:#fff;line-height:1.4}
h1{font-size:1.6rem;margin:0 0 .3rem}h2{font-size:1.25rem;margin:2rem 0 .5rem;border-bottom:1px solid #ddd}
h3{font-size:1.05rem;margin:1.2rem 0 .4rem}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.85rem;margin:.4rem 0 1rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;vertical-align:top}
th{background:#f0f0f0;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:nth-child(even){background:#fafafa}
td.pass{background:#dff3df}td.fail{background:#f8dcdc}td.error{background:#f3c2c2}td.noref{background:#eeeeee}
img.plot{max-width:100%;height:auto;border:1px solid #ddd}
dl.prov{display:grid;grid-template-columns:max-content auto;gap:.15rem 1rem;font-size:.85rem}
dl.prov dt{font-weight:600}dl.prov dd{margin:0;font-family:ui-monospace,monospace;word-break:break-all}
pre{background:#f6f6f6;padding:.6rem;overflow-x:auto;font-size:.8rem}
.muted{color:#666;font-size:.85rem}
""".strip()


def esc(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def href(name: str) -> str:
    return esc(quote(str(name)))


# ---------------------------------------------------------------------------------------------
# the Markdown of report.render_table(fmt="md") -> HTML (exactly the subset it writes)

_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def _md_cells(line: str) -> list:
    parts = _CELL_SPLIT.split(line.strip())
    if parts and parts[0].strip() == "":
        parts = parts[1:]
    if parts and parts[-1].strip() == "":
        parts = parts[:-1]
    return [p.strip().replace("\\|", "|") for p in parts]


def _md_table_html(lines: list) -> str:
    header = _md_cells(lines[0])
    align = _md_cells(lines[1]) if len(lines) > 1 else []
    right = [a.endswith(":") and not a.startswith(":") for a in align] + [False] * len(header)
    body = [_md_cells(l) for l in lines[2:]]
    out = ['<div class="scroll"><table>', "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) +
           "</tr></thead>", "<tbody>"]
    for row in body:
        tds = []
        for i, v in enumerate(row):
            cls = []
            if right[i]:
                cls.append("num")
            if i < len(header) and header[i] == "Status":
                cls.append(STATUS_CLASS.get(v.split(":")[0].strip(), ""))
            c = " ".join(x for x in cls if x)
            tds.append(f'<td class="{c}">{esc(v)}</td>' if c else f"<td>{esc(v)}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def markdown_to_html(md: str) -> str:
    """Tables (`| a | b |` + an alignment row), a `**title**` line, `- ` bullets and paragraphs."""
    return "\n".join(markdown_blocks(md))


def markdown_blocks(md: str) -> list:
    """The HTML blocks of `markdown_to_html`, in order."""
    blocks, lines = [], md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.lstrip().startswith("|"):
            j = i
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            blocks.append(_md_table_html(lines[i:j]))
            i = j
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{esc(lines[i][2:])}</li>")
                i += 1
            blocks.append("<ul>\n" + "\n".join(items) + "\n</ul>")
        elif line.startswith("**") and line.rstrip().endswith("**") and len(line.strip()) > 4:
            blocks.append(f"<h3>{esc(line.strip()[2:-2])}</h3>")
            i += 1
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith(("|", "- ")):
                para.append(lines[i])
                i += 1
            blocks.append(f"<p>{esc(' '.join(para))}</p>")
    return blocks


# ---------------------------------------------------------------------------------------------
# provenance

def _distinct(values) -> list:
    return list(dict.fromkeys(str(v) for v in values if v not in (None, "")))


def records_provenance(records: list) -> dict:
    """What the records of one (table, profile) were computed with: distinct values, oldest first."""
    recs = sorted(records, key=lambda r: r.get("date_utc") or "")
    env = [r.get("env") or {} for r in recs]
    speed = [r.get("speed") or {} for r in recs]
    dates = [r.get("date_utc") for r in recs if r.get("date_utc")]
    return {
        "records": len(recs),
        "git_sha": _distinct(e.get("git_sha") for e in env),
        "git_dirty": _distinct(e.get("git_dirty") for e in env),
        "bench_version": _distinct(e.get("bench_version") or e.get("bench") for e in env),
        "torch": _distinct(e.get("torch") for e in env),
        "timm": _distinct(e.get("timm") for e in env),
        "transformers": _distinct(e.get("transformers") for e in env),
        "open_clip": _distinct(e.get("open_clip") for e in env),
        "python": _distinct(e.get("python") for e in env),
        "platform": _distinct(e.get("platform") for e in env),
        "cpu": _distinct(e.get("cpu_name") for e in env),
        "device": _distinct(e.get("device_name") for e in env),
        "gpu_count": _distinct(e.get("gpu_count") for e in env),
        "cuda": _distinct(e.get("cuda_version") or e.get("cuda") for e in env),
        "speed": _distinct(f"{s.get('device')} {s.get('precision')} batch {s.get('batch_size')}"
                           for s in speed if s.get("device")),
        "hosts": _distinct((r.get("runner") or {}).get("host") for r in recs),
        "run_ids": len(_distinct(r.get("run_id") for r in recs)),
        "date_first": dates[0] if dates else None,
        "date_last": dates[-1] if dates else None,
    }


def publisher_provenance(command: str) -> dict:
    """The commit, machine and package versions of this publish (bench.measure.env_info), and its date."""
    from importlib import metadata

    from bench.measure import env_info

    env = env_info()
    versions = {}
    for name in ("prune-bench",) + VERSION_KEYS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = env.get("python")
    return {
        "command": command,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": env.get("git_sha"),
        "git_dirty": env.get("git_dirty"),
        "machine": {"platform": env.get("platform"), "cpu": env.get("cpu_name"),
                    "device": env.get("device_name"), "gpu_count": env.get("gpu_count"),
                    "cuda": env.get("cuda_version") if env.get("cuda_available") else None},
        "versions": versions,
    }


def _dl(pairs) -> str:
    rows = []
    for k, v in pairs:
        if isinstance(v, list):
            v = "; ".join(v) if v else None
        rows.append(f"<dt>{esc(k)}</dt><dd>{esc(v if v not in (None, '') else '-')}</dd>")
    return '<dl class="prov">' + "".join(rows) + "</dl>"


def _records_dl(p: dict) -> str:
    return _dl([
        ("records", str(p["records"])), ("computed", f"{p['date_first'] or '-'} .. {p['date_last'] or '-'}"),
        ("runs", str(p["run_ids"])), ("git commit", p["git_sha"]), ("uncommitted changes", p["git_dirty"]),
        ("suite version", p["bench_version"]), ("torch", p["torch"]), ("timm", p["timm"]),
        ("transformers", p["transformers"]), ("open_clip", p["open_clip"]), ("python", p["python"]),
        ("platform", p["platform"]), ("CPU", p["cpu"]), ("device", p["device"]), ("GPUs", p["gpu_count"]),
        ("CUDA", p["cuda"]), ("throughput measured on", p["speed"]), ("hosts", p["hosts"]),
    ])


def _publisher_dl(pub: dict) -> str:
    m, v = pub["machine"], pub["versions"]
    return _dl([("date", pub["date_utc"]), ("git commit", pub["commit"]), ("uncommitted changes", pub["git_dirty"]),
                ("command", pub["command"]), ("platform", m["platform"]), ("CPU", m["cpu"]), ("device", m["device"]),
                ("GPUs", m["gpu_count"]), ("CUDA", m["cuda"])] + [(k, x) for k, x in v.items()])


# ---------------------------------------------------------------------------------------------
# pages

def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(title)}</title>\n<style>\n{CSS}\n</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _discover(output: Path, only) -> list:
    if not output.is_dir():
        raise BenchError(f"--output {output}: no such folder (the folder `bench run --output` wrote to)")
    names = sorted(p.name for p in output.iterdir() if (p / "records").is_dir() and any((p / "records").glob("*.json")))
    if only:
        missing = [t for t in only if t not in names]
        if missing:
            raise BenchError(f"--tables: no records of {', '.join(missing)} under {output} "
                             f"(tables with records there: {', '.join(names) or 'none'})")
        names = [n for n in names if n in only]
    return names


def collect(output: Path, only=None, warn=print) -> list:
    """[{table, card, profiles: [{profile, records}]}] of every table with records under `output`, in name order.
    A folder that is not a known card (or whose card does not load) is skipped with a warning."""
    from bench.cards import card_dict, load_checked_card
    from bench.config import Paths
    from bench.pytest_plugin import _records_for
    from bench.records import load_records

    paths = Paths.resolve(output=output)
    out = []
    for name in _discover(Path(output), only):
        try:
            card = card_dict(load_checked_card(name))
        except BenchError as e:
            warn(f"skipped {name}: {e}")
            continue
        profiles = sorted({r.get("profile") for r in load_records(paths.output, name)} - {None},
                          key=lambda p: (p != "paper", p != "micro", p))
        entries = [{"profile": p, "records": recs} for p in profiles if (recs := _records_for(card, paths, p))]
        if not entries:
            warn(f"skipped {name}: no current record (of card version {card.get('version')} and the code now; "
                 f"`bench report --table {name}` lists the stale ones)")
            continue
        out.append({"table": name, "card": card, "profiles": entries})
    return out


def _status_counts(records) -> str:
    c = Counter(r.get("status") for r in records)
    words = {"pass": "passed", "fail": "failed", "error": "error", "no_ref": "no reference"}
    return ", ".join(f"{c[k]} {w}" for k, w in words.items() if c.get(k)) or "-"


def _table_page(entry: dict, folder: Path, pub: dict) -> list:
    """Write <folder>/index.html, the CSVs and PNGs of one table; return one summary dict per profile."""
    from bench import report

    card, table = entry["card"], entry["table"]
    title = card.get("title") or table
    sections, summary = [], []
    for e in entry["profiles"]:
        profile, recs = e["profile"], e["records"]
        csv_name = report.leaderboard_filename(card, recs)
        png_name = f"{report.sanitize(table)}-{report.sanitize(profile)}.png"
        csv_text = report.leaderboard_csv_text(card, recs)
        _write_text(folder / csv_name, csv_text)
        report.plot(card, recs, folder / png_name)
        prov = records_provenance(recs)
        rel = report.format_relations(report.relation_checks(card, recs))
        # the table, then its plot, then the reference numbers and notes under it
        blocks = markdown_blocks(report.render_table(card, recs, "md"))
        first = next((i for i, b in enumerate(blocks) if b.startswith('<div class="scroll"><table>')), len(blocks) - 1)
        plot_html = (f'<p><img class="plot" src="{href(png_name)}" '
                     f'alt="{esc(title)}: primary metric against params and FLOPs ({esc(profile)} profile)"></p>')
        parts = [f'<section class="profile" id="profile-{esc(profile)}">',
                 f"<h2>{esc(profile)} profile</h2>",
                 f'<p>Download: <a class="csv" href="{href(csv_name)}" download>{esc(csv_name)}</a> '
                 f'(leaderboard CSV, {max(0, len(csv_text.splitlines()) - 1)} rows); records: '
                 f"{esc(_status_counts(recs))}</p>",
                 *blocks[:first + 1], plot_html, *blocks[first + 1:]]
        if rel:
            parts.append(f"<h3>Relations stated by the paper</h3>\n<pre>{esc(rel)}</pre>")
        parts += ["<h3>Provenance of these numbers</h3>", _records_dl(prov), "</section>"]
        sections.append("\n".join(parts))
        summary.append({"table": table, "title": title, "version": card.get("version"), "profile": profile,
                        "csv": csv_name, "png": png_name, "records": recs, "provenance": prov})
    toc = " | ".join(f'<a href="#profile-{esc(e["profile"])}">{esc(e["profile"])}</a>' for e in entry["profiles"])
    body = "\n".join([
        '<p class="muted"><a href="../index.html">All tables</a></p>',
        f"<h1>{esc(title)}</h1>",
        f'<p class="muted">card <code>{esc(table)}</code> v{esc(card.get("version", "?"))}; profiles: {toc}</p>',
        *sections,
        "<h2>This page</h2>",
        _publisher_dl(pub),
    ])
    _write_text(folder / "index.html", _page(f"{title} - prune-bench", body))
    return summary


def _index_page(summaries: list, pub: dict) -> str:
    rows = []
    for s in summaries:
        t = href(s["table"])
        rows.append("<tr>" + "".join([
            f'<td><a class="table-link" href="{t}/index.html#profile-{esc(s["profile"])}">{esc(s["table"])}</a></td>',
            f"<td>{esc(s['title'])}</td>", f"<td>{esc(s['version'])}</td>", f"<td>{esc(s['profile'])}</td>",
            f'<td class="num">{len(s["records"])}</td>', f"<td>{esc(_status_counts(s['records']))}</td>",
            f"<td>{esc(s['provenance']['date_last'] or '-')}</td>",
            f"<td>{esc('; '.join(c[:12] for c in s['provenance']['git_sha']) or '-')}</td>",
            f'<td><a href="{t}/{href(s["csv"])}" download>CSV</a></td>',
        ]) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("Table", "Title", "Card version", "Profile", "Records", "Record status",
                                             "Last computed", "Commit", "Download"))
    body = "\n".join([
        "<h1>prune-bench leaderboard</h1>",
        '<p>Structured pruning of Transformers, reproduced one paper table at a time. Each page has the '
        'paper-style table, its plot, where the numbers come from and the CSV.</p>',
        f'<div class="scroll"><table id="tables"><thead><tr>{head}</tr></thead><tbody>',
        *rows, "</tbody></table></div>",
        "<h2>Published by</h2>", _publisher_dl(pub),
    ])
    return _page("prune-bench leaderboard", body)


def _replace_site(tmp: Path, site: Path) -> None:
    if site.exists():
        if not site.is_dir():
            raise BenchError(f"--site {site}: a file, not a folder")
        if any(site.iterdir()) and not (site / MARKER).is_file():
            raise BenchError(f"--site {site}: the folder is not empty and was not written by `bench publish` "
                             f"(no {MARKER} in it); give an empty or new folder")
        shutil.rmtree(site)
    tmp.rename(site)


def write_results(results: Path, site: Path, summaries: list, pub: dict) -> Path:
    """Each (table, profile)'s CSV and plot (the site's files) into `results`, and results/PROVENANCE.json."""
    from bench.report import sanitize

    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    files, replaced = [], []
    for s in summaries:
        for name in (s["csv"], s["png"]):
            data = (site / s["table"] / name).read_bytes()
            atomic_write(results / name, lambda f, data=data: f.write(data))
        # the same table and profile under another precision or device name: an older file, not to be compared with
        for other in results.glob(f"{sanitize(s['table'])}-{sanitize(s['profile'])}-*.csv"):
            if other.name != s["csv"]:
                other.unlink()
                replaced.append(other.name)
        p = s["provenance"]
        files.append({"table": s["table"], "card_version": s["version"], "profile": s["profile"], "csv": s["csv"],
                      "png": s["png"], "records": p["records"], "computed_from": p["date_first"],
                      "computed_to": p["date_last"], "git_sha": p["git_sha"], "git_dirty": p["git_dirty"],
                      "device": p["device"], "cpu": p["cpu"], "platform": p["platform"], "speed": p["speed"],
                      "torch": p["torch"], "timm": p["timm"], "transformers": p["transformers"],
                      "open_clip": p["open_clip"]})
    written = {f["csv"] for f in files}
    others = sorted(p.name for p in results.glob("*.csv") if p.name not in written)
    doc = {**pub, "files": files, "removed_csvs": sorted(replaced), "other_csvs_not_written_by_this_publish": others}
    return atomic_write(results / PROVENANCE_FILE,
                        lambda f: f.write((json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()))


def publish(output, site, results=None, tables=None, command: str = "", warn=print) -> dict:
    """Build the site from `output`'s records (replacing `site` as a whole); optionally write `results`."""
    output, site = Path(output), Path(site)
    entries = collect(output, tables, warn)
    if not entries:
        raise BenchError(f"no table with records of its current card under {output}: run "
                         f"`python -m bench run --table NAME --output {output}` first")
    pub = publisher_provenance(command)
    site.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{site.name}.", dir=site.parent))
    try:
        summaries = []
        for e in entries:
            for s in _table_page(e, tmp / e["table"], pub):
                summaries.append({**s, "card": e["card"]})
        _write_text(tmp / "index.html", _index_page(summaries, pub))
        (tmp / MARKER).write_text("written by `python -m bench publish`; the next publish replaces this folder\n")
        tmp.chmod(0o755)
        _replace_site(tmp, site)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    prov = write_results(results, site, summaries, pub) if results else None
    return {"site": site, "index": site / "index.html", "pages": [site / e["table"] / "index.html" for e in entries],
            "summaries": summaries, "provenance": prov}
