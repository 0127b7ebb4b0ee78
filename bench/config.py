"""Where things live. Environment variables, overridden by CLI flags:
BENCH_DATA (data sets in their public layouts), BENCH_CHECKPOINTS (official weights),
BENCH_CACHE (micro data, micro dense models), BENCH_OUTPUT (cell records, CSVs, plots)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _env_path(name: str, default: Path) -> Path:
    v = os.environ.get(name)
    return Path(v).expanduser() if v else default


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return _env_path("BENCH_CACHE", Path(base) / "prune-bench")


@dataclass
class Paths:
    data_root: Path
    checkpoints: Path
    cache: Path
    output: Path

    @classmethod
    def resolve(cls, data_root=None, checkpoints=None, cache=None, output=None) -> "Paths":
        cache = Path(cache).expanduser() if cache else default_cache()
        return cls(
            data_root=Path(data_root).expanduser() if data_root else _env_path("BENCH_DATA", Path("data")),
            checkpoints=Path(checkpoints).expanduser() if checkpoints else _env_path("BENCH_CHECKPOINTS", Path("checkpoints")),
            cache=cache,
            output=Path(output).expanduser() if output else _env_path("BENCH_OUTPUT", cache / "results"),
        )
