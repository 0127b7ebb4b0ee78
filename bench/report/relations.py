"""Reporting: formatting the paper's relation checks (the card's `relations`: claims stated without a number per cell,
such as "no accuracy loss", "0.96% above SGMP", "26.57% faster"), judged on the records.
"""
from __future__ import annotations

from bench.judge import relation_checks  # noqa: F401  (judged in bench.judge; re-exported)

def format_relations(checks) -> str:
    if not checks:
        return ""
    lines = ["Relations stated by the paper (INFO = measured on a profile the claims are not judged on):"]
    for c in checks:
        lines.append(f"  [{c['status']}] {c['kind']} ({c['method']}): {c['measured']} (tol {c['tolerance']}); "
                     f"source: {c['source']}")
    return "\n".join(lines) + "\n"
