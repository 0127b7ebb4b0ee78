"""Reporting: the leaderboard CSV, paper-style tables (terminal / Markdown / CSV / LaTeX), retention tables.

The rows and cells come from `bench.report.aggregate`; `render_table` adds the card's paper references and
the notes under the table (conventions, measured speed, re-implementations, the random-units floor of
`floor_notes`). `render_against` renders the `--against` differences.
"""
from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from pathlib import Path

from bench.atomic import atomic_write
from bench.report.aggregate import (LEADERBOARD_COLUMNS, _aggregate, _decimals_of, _ep, _first, _fmt, _get,
                                    _metric_decimals, _num, _ref_rows, against_rows, card_metrics, card_references,
                                    format_tolerance, leaderboard_rows, primary_metric)

STATUS_WORDS = {"pass": "PASSED", "fail": "FAILED", "no_ref": "NO-REF", "error": "ERROR"}
REIMPL_SENTENCE = ("Rows marked (reimpl) are re-implementations written for this suite, not the authors' code; "
                   "a gap to the paper may come from the re-implementation.")
# ---------------------------------------------------------------------------------------------
# leaderboard CSV

def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.10g}"
    return str(v)


def _atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def leaderboard_csv_text(card: dict, records) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LEADERBOARD_COLUMNS)
    for row in leaderboard_rows(card, records):
        w.writerow([_csv_value(row[c]) for c in LEADERBOARD_COLUMNS])
    return buf.getvalue()


def write_leaderboard_csv(card: dict, records, path) -> Path:
    """Write the leaderboard CSV atomically (temp file + os.replace): header = LEADERBOARD_COLUMNS."""
    return _atomic_write_bytes(path, leaderboard_csv_text(card, records).encode())


def sanitize(name) -> str:
    """A file-name-safe token: lower case, runs of other characters -> "_" (e.g. "NVIDIA H100 80GB HBM3"
    -> "nvidia_h100_80gb_hbm3")."""
    s = re.sub(r"[^a-z0-9.]+", "_", str(name).lower()).strip("_.")
    return s or "unknown"


def leaderboard_filename(card: dict, records) -> str:
    """`<table>-<profile>-<precision>-<device>.csv` (timm style; the most common values of the records)."""
    table = card.get("table") or _first(r.get("table") for r in records) or "table"
    recs = [r for r in records if r and (card.get("table") is None or r.get("table") == card.get("table"))]

    def common(values, default):
        c = Counter(v for v in values if v)
        return c.most_common(1)[0][0] if c else default

    profile = common((r.get("profile") for r in recs), "micro")
    # a record without a speed (its cell crashed) names the precision its device times with, so that a run in
    # which every cell crashed writes the same file as a good run (not a second, "-unknown-" one)
    prec = common((_get(r, "speed", "precision") or
                   {"cuda": "amp_fp16", "cpu": "fp32"}.get(_get(r, "config", "device")) for r in recs), "unknown")
    device = common((_get(r, "env", "device_name") or _get(r, "speed", "device") for r in recs), "unknown")
    return f"{sanitize(table)}-{sanitize(profile)}-{sanitize(prec)}-{sanitize(device)}.csv"


def write_table_csv(card: dict, records, folder) -> Path:
    """Write the leaderboard CSV of `records` (the current records of the card's cells) into the table's folder
    and remove every other `<table>-<profile>-*.csv` there: those were built from records that are no longer
    the current ones (another device name, or a run whose cells all crashed), so none is left to mislead."""
    folder = Path(folder)
    name = leaderboard_filename(card, records)
    path = write_leaderboard_csv(card, records, folder / name)
    profile = name[len(sanitize(card.get("table") or "table")) + 1:].split("-")[0]
    for other in folder.glob(f"{sanitize(card.get('table') or 'table')}-{profile}-*.csv"):
        if other.name != name:
            other.unlink(missing_ok=True)
    return path

# ---------------------------------------------------------------------------------------------
# paper-style table

def _method_name(cell: dict) -> str:
    name = f"{cell['method']} (reimpl)" if cell.get("method_impl") == "reimpl" else str(cell["method"])
    return f"{name} {cell['selection']}" if cell.get("selection") else name


def _train_text(cell: dict) -> str:
    """The row's training compute: total epochs of search + finetune, with the phases when there are several."""
    if cell["method"] == "dense" or _num(cell.get("train_epochs")) is None:
        return "-" if cell.get("train_steps") is None else f"{cell['train_steps']} steps"
    total = _ep(cell["train_epochs"])
    phases = cell.get("train_phases") or ""
    return f"{total} ({phases})" if "+" in phases else total


def _status_text(cell: dict) -> str:
    word = STATUS_WORDS.get(cell["status"], str(cell["status"]).upper())
    return f"{word}: {cell['reason']}" if cell.get("reason") else word


def _table_cells(card: dict, cells: list, pm: str) -> tuple[list, list]:
    metrics = list(dict.fromkeys(m["name"] for m in card_metrics(card))) or (list(cells[0]["metrics"]) if cells else [])
    multi = len({c["profile"] for c in cells}) > 1
    parts = any(c.get("part") for c in cells)
    part_col = ("Task" if "tasks" in card else
                "Budget" if all((c.get("part") or "").endswith("matched") or not c.get("part") for c in cells)
                else "Model")
    inference = any(_num(c.get("gmacs_inference")) is not None for c in cells)
    header = (["Profile"] if multi else []) + ([part_col] if parts else []) + ["Method", "Ratio"] + metrics + [
        "Params M", "GFLOPs"] + (["GFLOPs inf."] if inference else []) + [
        "Throughput/s", "Speedup meas./FLOPs", "Compress s", "Train ep.", "Status"]
    body = []
    for c in cells:
        part_text = str(c.get("part") or ("paper" if part_col == "Budget" else ""))
        row = ([str(c["profile"])] if multi else []) + ([part_text] if parts else []) + [
            _method_name(c), str(c["ratio_label"])]
        for name in metrics:
            m = c["metrics"].get(name) or {}
            d = _metric_decimals(card, name)
            if _num(m.get("value")) is None:
                row.append("-")
                continue
            s = _fmt(m["value"], d)
            if m.get("std") is not None and (m.get("n") or 0) > 1:
                s += f" {pm} {_fmt(m['std'], d)}"
            if c["method"] != "dense" and m.get("delta") is not None:
                s += f" ({m['delta']:+.{d}f})"
            row.append(s)
        p = _fmt(c["params_m"])
        if c["method"] != "dense" and _num(c["achieved_param_reduction"]) is not None:
            p += f" (-{100 * c['achieved_param_reduction']:.1f}%)"
        g = _fmt(c["gmacs"])
        if c["method"] != "dense" and _num(c["macs_reduction"]) is not None:
            g += f" (-{100 * c['macs_reduction']:.1f}%)"
        meas = f"{c['speedup_measured']:.2f}x" if _num(c["speedup_measured"]) is not None else "-"
        theo = f"{c['speedup_theoretical']:.2f}x" if _num(c["speedup_theoretical"]) is not None else "-"
        row += [p, g] + ([_fmt(c.get("gmacs_inference"))] if inference else []) + [
            _fmt(c["throughput_sps"]), f"{meas} / {theo}",
            _fmt(c.get("compress_s"), 1) if c["method"] != "dense" else "-", _train_text(c), _status_text(c)]
        body.append(row)
    return header, body


def _footnotes(card: dict, cells: list) -> tuple[list, list, list]:
    """(heading lines, reference table (header, rows) or None, other lines)."""
    refs = card_references(card)
    ref_profile = refs.get("profile", "paper")
    metric_names = [m["name"] for m in card_metrics(card)]
    ref_header, ref_body = None, []
    rows = _ref_rows(card)
    if rows:
        extra = [k for k in ("params_m", "gflops") if any(k in r for r in rows)]
        cols = [n for n in metric_names if any(n in r for r in rows)] + extra
        ref_header = ["Method", "Ratio"] + cols
        dec = {k: min(3, max([1] + [_decimals_of(r[k]) for r in rows if _num(r.get(k)) is not None])) for k in cols}
        for r in rows:
            ref_body.append([str(r.get("method")), str(r.get("ratio", ""))] +
                            [(_fmt(r[k], dec[k]) if _num(r.get(k)) is not None else "-") for k in cols])
    profiles = sorted({str(c["profile"]) for c in cells})
    if rows:
        head = f"Paper reference ({refs.get('source', 'source not given')}), for the {ref_profile} profile"
        tol = refs.get("tolerance") or {}
        if tol:
            head += "; tolerance " + ", ".join(f"{k} {format_tolerance(v)}" for k, v in tol.items())
        if profiles and ref_profile not in profiles:
            head += f"; not compared with the {'/'.join(profiles)} rows above"
        head += ":"
    else:
        head = "No paper reference numbers in this card."
    notes = []
    for n in card.get("notes") or []:
        notes.append(f"Note: {' '.join(str(n).split())}")
    if card.get("ratio_meaning"):
        notes.append(f"Ratio: {' '.join(str(card['ratio_meaning']).split())}")
    notes.append("Params: all parameters of the deployed model, in millions; in parentheses the achieved "
                 "reduction of the prunable parameters. GFLOPs: multiply-accumulates / 1e9 (one MAC = one FLOP), "
                 "in parentheses the reduction vs dense. Metric deltas in parentheses are vs the dense row. "
                 "Compress s: wall time of the method's search/pruning (before the common finetune), seconds.")
    if any(_num(c.get("gmacs_inference")) is not None for c in cells):
        notes.append("GFLOPs follows the paper's FLOPs protocol (" + " ".join(str(
            (card.get("protocol") or {}).get("flops", {}).get("input", "")).split()) + "); GFLOPs inf. is the "
            "inference-only forward of the same model, counted the same way.")
    speeds = Counter()
    for c in cells:
        if _num(c["throughput_sps"]) is not None:
            dev = c["device_name"] or c["speed_device"] or "unknown device"
            speeds[(dev, c["precision"] or "unknown precision", c["tput_batch_size"], c["speed_trials"])] += 1
    for (dev, prec, bs, trials), _ in speeds.most_common():
        t = f", median of {trials} trials" if trials else ""
        notes.append(f"Throughput: samples/s on {dev}, {prec}, batch size {bs}{t}. Speedup: measured "
                     f"throughput ratio vs dense (timed in alternation within the cell) / FLOPs ratio dense/pruned.")
    if not speeds:
        notes.append("Throughput: not measured.")
    if any(c.get("method_impl") == "reimpl" for c in cells):
        notes.append(REIMPL_SENTENCE)
    notes += floor_notes(card, cells)
    return [head], ((ref_header, ref_body) if ref_header else None), notes


def floor_notes(card: dict, cells: list) -> list[str]:
    """The random-units floor: every row trained for as many epochs as a `random` row of the same profile, part
    and ratio (matched compute) whose primary-metric mean does not beat random's gets one line saying so."""
    pm = primary_metric(card)
    if not pm:
        return []
    name, hib = pm["name"], pm.get("higher_is_better", True)

    def value(c):
        return _num((c["metrics"].get(name) or {}).get("value"))

    floors = [c for c in cells if c["method"] == "random" and value(c) is not None
              and _num(c.get("train_epochs")) is not None]
    out = []
    for c in cells:
        if c["method"] in ("random", "dense") or value(c) is None:
            continue
        for f in floors:
            if (f["profile"], str(f["ratio_label"])) != (c["profile"], str(c["ratio_label"])) or \
                    _num(c.get("train_epochs")) != _num(f["train_epochs"]):
                continue
            a, b = value(c), value(f)
            if (a <= b) if hib else (a >= b):
                where = f" [{c['part']}]" if c.get("part") else ""
                out.append(f"Floor: {_method_name(c)} at {c['ratio_label']}{where} does not beat random units at the "
                           f"same training ({_ep(c['train_epochs'])} epochs): {name} {_fmt(a)} vs {_fmt(b)}.")
            break
    return out


_TEXT_COLUMNS = ("Method", "Ratio", "Profile", "Task", "Model", "Status", "layer", "modality")


def _aligned(header, body) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header] + body) for i in range(len(header))]

    def line(r):
        out = []
        for i, (v, w) in enumerate(zip(r, widths)):
            left = i == 0 or header[i] in _TEXT_COLUMNS
            out.append(str(v).ljust(w) if left else str(v).rjust(w))
        return "  ".join(out).rstrip()
    return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body]


def _md_table(header, body) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    align = ["---" if h in _TEXT_COLUMNS else "---:" for h in header]
    return (["| " + " | ".join(esc(h) for h in header) + " |", "| " + " | ".join(align) + " |"] +
            ["| " + " | ".join(esc(v) for v in r) + " |" for r in body])


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(s) -> str:
    s = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(s))
    return s.replace("±", r"$\pm$")


def _latex_table(header, body) -> list[str]:
    spec = "".join("l" if h in ("Method", "Ratio", "Profile", "Status") else "r" for h in header)
    out = [r"\begin{tabular}{" + spec + "}", r"\toprule",
           " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    out += [" & ".join(latex_escape(v) for v in r) + r" \\" for r in body]
    out += [r"\bottomrule", r"\end{tabular}"]
    return out


def render_table(card: dict, records, fmt: str = "terminal") -> str:
    """The paper-style table of a card's records: fmt is "terminal", "md", "csv" or "latex"."""
    if fmt not in ("terminal", "md", "csv", "latex"):
        raise ValueError(f"unknown table format {fmt!r}: use terminal, md, csv or latex")
    cells = _aggregate(card, records)
    header, body = _table_cells(card, cells, "±")
    head, ref, notes = _footnotes(card, cells)
    title = card.get("title") or card.get("table") or ""
    profiles = "/".join(sorted({str(c["profile"]) for c in cells})) or "no records"
    title = f"{title} [{card.get('table')} v{card.get('version', '?')}, profile {profiles}]"
    if fmt == "terminal":
        out = [title, ""] + _aligned(header, body) + ["", *head]
        if ref:
            out += ["  " + l for l in _aligned(*ref)]
        out += [""] + notes
    elif fmt == "md":
        out = [f"**{title}**", ""] + _md_table(header, body) + ["", *head]
        if ref:
            out += [""] + _md_table(*ref)
        out += [""] + [f"- {n}" for n in notes]
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(body)
        out = [buf.getvalue().rstrip("\n"), f"# {title}", *(f"# {h}" for h in head)]
        if ref:
            out += ["# " + ", ".join(ref[0])] + ["# " + ", ".join(r) for r in ref[1]]
        out += [f"# {n}" for n in notes]
    else:
        out = [f"% {title}"] + _latex_table(header, body) + ["", r"\smallskip", r"{\footnotesize"]
        out += [latex_escape(h) + r"\\" for h in head]
        if ref:
            out += _latex_table(*ref) + [r"\\"]
        out += [latex_escape(n) + r"\\" for n in notes] + ["}"]
    return "\n".join(out) + "\n"

# ---------------------------------------------------------------------------------------------
# retention

def _retention_labels(ret: list) -> list:
    """A row label per retention entry: its modality, plus the module's role inside the layer when one
    layer has several groups of the same modality and kind (NLVR2's two cross-attentions per text layer:
    "fusion crossattention.self0" and "fusion crossattention.self1")."""
    seen = Counter((g.get("modality"), g.get("layer"), g.get("kind")) for g in ret)
    split = {(m, k) for (m, layer, k), n in seen.items() if n > 1 and layer is not None}
    labels = []
    for g in ret:
        label = str(g.get("modality"))
        if (g.get("modality"), g.get("kind")) in split:
            module = str(g.get("group", "")).split(":")[0]
            role = module.split(f".{g.get('layer')}.", 1)[-1] if g.get("layer") is not None else module
            label += f" {role}"
        labels.append(label)
    return labels


def retention_table(record: dict) -> str:
    """Per layer (and modality), the fraction of units kept for each unit kind: "0.75 (48/64)".
    Groups without a layer (e.g. the hidden width) are shown as layer "-"; a last row sums each kind."""
    ret = record.get("retention") or []
    if not ret:
        return "no retention data (dense model or the cell did not finish)\n"
    kinds = list(dict.fromkeys(g.get("kind") for g in ret))
    labels = _retention_labels(ret)
    modalities = list(dict.fromkeys(labels))
    multi = len(modalities) > 1
    acc: dict = {}
    totals = {k: [0, 0] for k in kinds}
    for g, label in zip(ret, labels):
        key = (label, g.get("layer"))
        cell = acc.setdefault(key, {}).setdefault(g.get("kind"), [0, 0])
        cell[0] += int(g.get("kept") or 0)
        cell[1] += int(g.get("size") or 0)
        totals[g.get("kind")][0] += int(g.get("kept") or 0)
        totals[g.get("kind")][1] += int(g.get("size") or 0)

    def frac(ks):
        return f"{ks[0] / ks[1]:.2f} ({ks[0]}/{ks[1]})" if ks and ks[1] else "-"

    order = sorted(acc, key=lambda k: (modalities.index(k[0]), k[1] is None, k[1] if k[1] is not None else 0))
    header = (["modality"] if multi else []) + ["layer"] + [str(k) for k in kinds]
    body = []
    for mod, layer in order:
        body.append(([str(mod)] if multi else []) + ["-" if layer is None else str(layer)] +
                    [frac(acc[(mod, layer)].get(k)) for k in kinds])
    body.append(([""] if multi else []) + ["all"] + [frac(totals[k]) for k in kinds])
    title = (f"Retention (fraction of units kept): {record.get('method')} {record.get('ratio_label')} "
             f"seed {record.get('seed')}")
    lines = [title] + _aligned(header, body)
    return "\n".join(lines) + "\n"

def retention_summary(card: dict, records) -> str:
    """One line per pruned cell: the kept fraction of each unit kind, layer by layer (the compact form of
    `retention_table`; `report --retention` prints the full one)."""
    lines = []
    order = {m: i for i, m in enumerate(card.get("methods") or [])}
    for r in sorted(records, key=lambda r: (order.get(r["method"], 99), r.get("ratio_p") or 0, r.get("seed") or 0)):
        ret = r.get("retention") or []
        if r["method"] == "dense" or not ret:
            continue
        parts = []
        labels = _retention_labels(ret)
        multi = len(set(labels)) > 1
        for label, kind in dict.fromkeys((label, g["kind"]) for g, label in zip(ret, labels)):
            gs = sorted((g for g, lab in zip(ret, labels) if g["kind"] == kind and lab == label),
                        key=lambda g: g.get("layer") or 0)
            total = sum(g["kept"] for g in gs) / max(1, sum(g["size"] for g in gs))
            name = f"{label} {kind}" if multi else kind
            parts.append(f"{name} {total:.2f} [" + " ".join(f"{g['kept'] / g['size']:.2f}" for g in gs) + "]")
        lines.append(f"{r['method']:<14}{r['ratio_label']:>7} s{r['seed']}  " + "  ".join(parts))
    if not lines:
        return ""
    return "Retention (fraction of units kept: overall [per layer]):\n" + "\n".join(lines) + "\n"

# ---------------------------------------------------------------------------------------------
# differences to one method, with the seed noise (bench report --against METHOD; rows: aggregate.against_rows)
def render_against(card: dict, records, method: str, fmt: str = "terminal") -> str:
    """The `report --against METHOD` table: one row per cell, one column per metric: the difference to METHOD at
    the same ratio "+1.23 [-0.40, +2.86]" (95% Welch interval over the seeds), "~" when the interval holds 0."""
    rows = against_rows(card, records, method)
    if not rows:
        return f"No cell shares a ratio with {method} (or no finished records of {method}).\n"
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    parts = any(r["part"] for r in rows)
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["part"], r["method"], r["ratio_label"]), {})[r["metric"]] = r
    header = (["Part"] if parts else []) + ["Method", "Ratio"] + [f"{m} - {method}" for m in metrics] + ["seeds (n)"]
    body = []
    for (part, meth, label), by_metric in cells.items():
        row = ([part or ""] if parts else []) + [str(meth), str(label)]
        ns = None
        for m in metrics:
            r = by_metric.get(m)
            if r is None or r["diff"] is None:
                row.append("-")
                continue
            d = _metric_decimals(card, m)
            s = f"{r['diff']:+.{d}f}"
            if r["lo"] is not None:
                s += f" [{r['lo']:+.{d}f}, {r['hi']:+.{d}f}]" + (" ~" if r["noise"] else "")
            else:
                s += " (one seed: no interval)"
            row.append(s)
            ns = f"{r['n_a']} vs {r['n_b']}"
        body.append(row + [ns or "-"])
    lines = ([f"Differences to {method} at the same ratio (mean over seeds), with the 95% Welch confidence interval "
              f"over the seeds; ~: the interval holds 0 (the difference is within the seed noise)"])
    lines += _md_table(header, body) if fmt == "md" else _aligned(header, body)
    return "\n".join(lines) + "\n"
