"""Reporting: leaderboard CSV, paper-style tables (terminal / Markdown / CSV / LaTeX), plots, retention.

Inputs are a table card (the dict of `yaml.safe_load(card file)`) and cell records (the JSON dicts of
`bench.records`, one per (method, ratio, seed)). Nothing here runs a model. One file per concern:

- `aggregate.py`: the card helpers, records -> cells and leaderboard rows (seed mean / std, dense values,
  status), training compute, and the `--against` differences with their Welch intervals;
- `render.py`: the leaderboard CSV (values, file name, writing), the paper-style table and its notes (floor
  notes included), the retention tables, the `--against` table;
- `plots.py`: the matplotlib plots (metric vs params / GFLOPs, retention heat-map);
- `relations.py`: the paper's relation checks (`relation_checks`, `format_relations`).

Import from `bench.report` (the names in `__all__`); the files import each other directly.
"""
from __future__ import annotations

from bench.report.aggregate import (DEFAULT_METRIC_TOLERANCE, LEADERBOARD_COLUMNS, against_rows, card_metrics,
                                    card_ratios, card_references, card_tolerance, code_version_text,
                                    format_tolerance, leaderboard_rows, parse_tolerance, primary_metric, t975,
                                    tolerance_abs, training_compute, welch_ci)
from bench.report.render import (REIMPL_SENTENCE, STATUS_WORDS, floor_notes, latex_escape, leaderboard_csv_text,
                                 leaderboard_filename, render_against, render_table, retention_summary,
                                 retention_table, sanitize, write_leaderboard_csv, write_table_csv)
from bench.report.relations import format_relations, relation_checks
from bench.report.plots import plot, retention_heatmap

__all__ = [
    # aggregate
    "DEFAULT_METRIC_TOLERANCE", "LEADERBOARD_COLUMNS", "against_rows", "card_metrics", "card_ratios",
    "card_references", "card_tolerance", "code_version_text", "format_tolerance", "leaderboard_rows",
    "parse_tolerance", "primary_metric", "t975", "tolerance_abs", "training_compute", "welch_ci",
    # render
    "REIMPL_SENTENCE", "STATUS_WORDS", "floor_notes", "latex_escape", "leaderboard_csv_text", "leaderboard_filename",
    "render_against", "render_table", "retention_summary", "retention_table", "sanitize", "write_leaderboard_csv",
    "write_table_csv",
    # relations
    "format_relations", "relation_checks",
    # plot
    "plot", "retention_heatmap",
]
