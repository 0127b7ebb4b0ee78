"""Reporting: matplotlib plots (Agg backend, pyplot untouched): the metric vs params/GFLOPs plot of a table,
and the retention heat-map of one cell. PNGs are written atomically.
"""
from __future__ import annotations

import io
from pathlib import Path

from bench.report.aggregate import _aggregate, _num, _primary_names, _ref_rows, card_references, primary_metric
from bench.report.render import _atomic_write_bytes, _method_name, _retention_labels

# ---------------------------------------------------------------------------------------------
# plot

def plot(card: dict, records, path) -> Path:
    """PNG, two panels: primary metric vs params (M) and vs GFLOPs; one line per method sorted by
    ratio (error bars = std over seeds), starting from the dense model (black star, dotted level);
    the card's paper references (x, dashed, same colour as the method) when they apply to the profile."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pm = primary_metric(card)
    cells = _aggregate(card, records)
    name = pm["name"] if pm else (next(iter(cells[0]["metrics"])) if cells and cells[0]["metrics"] else "metric")
    split, unit = (pm or {}).get("split"), (pm or {}).get("unit")
    ylabel = f"{name}" + (f" on {split}" if split else "") + (f" ({unit})" if unit else "")
    profiles = list(dict.fromkeys(c["profile"] for c in cells))
    multi = len(profiles) > 1
    refs = card_references(card)
    ref_rows = _ref_rows(card) if refs.get("profile", "paper") in profiles else []

    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key().get("color") or ["C0", "C1", "C2", "C3"]
    colors: dict = {"dense": "black"}
    for m in [c["method"] for c in cells] + [r.get("method") for r in ref_rows]:
        if m not in colors:
            colors[m] = cycle[(len(colors) - 1) % len(cycle)]

    series: dict = {}
    for c in cells:
        label = _method_name(c) + (f" [{c['profile']}]" if multi else "") + (f" [{c['part']}]" if c.get("part") else "")
        series.setdefault((c["profile"], c.get("part"), c["method"], label), []).append(c)
    dense_cells = {(c["profile"], c.get("part")): c for c in cells if c["method"] == "dense"}

    def y_of(c):   # multi-task cards: each task's own primary metric
        m = c["metrics"].get(name) or next((c["metrics"][n] for n in c["metrics"]
                                            if n in _primary_names(card, c.get("task"))), {})
        return _num(m.get("value")), _num(m.get("std")) or 0.0

    fig = Figure(figsize=(11, 4.4), dpi=110)
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    axes = fig.subplots(1, 2)
    for ax, xkey, rkey, xlabel in ((axes[0], "params_m", "params_m", "Params (M)"),
                                   (axes[1], "gmacs", "gflops", "GFLOPs (GMACs, 1 MAC = 1 FLOP)")):
        for (profile, part, method, label), cs in series.items():
            pts = sorted(((_num(c[xkey]), *y_of(c), _num(c["ratio_p"]) or 0.0) for c in cs), key=lambda t: t[3])
            pts = [t for t in pts if t[0] is not None and t[1] is not None]
            if not pts:
                continue
            xs, ys, errs = [t[0] for t in pts], [t[1] for t in pts], [t[2] for t in pts]
            if method == "dense":
                if part and (profile, None) in dense_cells:   # a part's dense row is the same model: one star
                    continue
                ax.plot(xs, ys, linestyle="none", marker="*", markersize=14, color="black", label=label, zorder=5)
                ax.axhline(ys[0], color="black", linestyle=":", linewidth=0.8)
                continue
            d = dense_cells.get((profile, part))
            dx = _num(d[xkey]) if d else None
            dy = y_of(d)[0] if d else None
            if dx is not None and dy is not None:   # each curve starts at the dense model
                ax.plot([dx, xs[0]], [dy, ys[0]], color=colors[method], linestyle=":", linewidth=1)
            # a second part (e.g. budget: matched) in the method's colour, dashed with square markers
            ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="s" if part else "o",
                        linestyle="--" if part else "-", color=colors[method], label=label, capsize=3)
        by_method: dict = {}
        for r in ref_rows:
            if _num(r.get(rkey)) is not None and _num(r.get(name)) is not None:
                by_method.setdefault(r.get("method"), []).append((float(r[rkey]), float(r[name])))
        for m, pts in by_method.items():
            pts.sort()
            ax.plot([t[0] for t in pts], [t[1] for t in pts], linestyle="--" if len(pts) > 1 else "none",
                    marker="x", markersize=8, color=colors.get(m, "gray"), alpha=0.7, label=f"{m} (paper)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    title = card.get("title") or card.get("table") or ""
    fig.suptitle(f"{title} [{'/'.join(map(str, profiles)) or 'no records'}]")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return _atomic_write_bytes(path, buf.getvalue())

# ---------------------------------------------------------------------------------------------
# retention heat-map
def retention_heatmap(record: dict, path) -> Path:
    """PNG heat-map of the kept fraction per layer (columns) and per module type (rows: modality + unit
    kind), as the UPop paper's figure of retained proportions. Atomic write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    import numpy as np

    ret = record.get("retention") or []
    labels = _retention_labels(ret)
    rows = list(dict.fromkeys((label, g.get("kind")) for g, label in zip(ret, labels)))
    layers = sorted({g.get("layer") for g in ret if g.get("layer") is not None})
    grid = np.full((max(1, len(rows)), max(1, len(layers))), np.nan)
    for g, label in zip(ret, labels):
        if g.get("layer") is None or not g.get("size"):
            continue
        r, c = rows.index((label, g.get("kind"))), layers.index(g.get("layer"))
        prev = grid[r, c]
        grid[r, c] = g["kept"] / g["size"] if np.isnan(prev) else (prev + g["kept"] / g["size"]) / 2
    label_width = 0.07 * max([len(f"{m} {k}") for m, k in rows] + [10])   # room for the row labels
    fig = Figure(figsize=(1.2 + label_width + 0.55 * max(1, len(layers)), 1.4 + 0.5 * max(1, len(rows))), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            if not np.isnan(grid[r, c]):
                ax.text(c, r, f"{100 * grid[r, c]:.0f}%", ha="center", va="center", fontsize=7,
                        color="white" if grid[r, c] < 0.6 else "black")
    ax.set_xticks(range(len(layers)), [str(x) for x in layers])
    ax.set_yticks(range(len(rows)), [f"{m} {k}" for m, k in rows])
    ax.set_xlabel("layer")
    fig.colorbar(im, ax=ax, label="fraction kept")
    ax.set_title(f"{record.get('table')}: {record.get('method')} {record.get('ratio_label')} "
                 f"(seed {record.get('seed')})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return _atomic_write_bytes(path, buf.getvalue())
