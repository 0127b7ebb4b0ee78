"""Before a run: the output folder is writable and has free space; leftover temp files are removed.

`check_writable(path, what, flag)` raises a BenchError naming the path and the fix (the CLI prints it as one
line and exits with code 2) when the folder is a file, cannot be created or written, or has less than
MIN_FREE_MB free; `bench run` calls it for --output (and the cache) before any cell runs.

`clean_temp_files(folders, run_start)` removes the temp files a killed writer left behind: every file is
written under a unique temporary name `.<name>.<host>-<pid>.<random>.tmp` (bench.atomic.temp_path) and renamed
into place, so a kill between the write and the rename leaves one. A temp file is removed when its writer is
certainly gone: it was written on this host (the host tag matches) by a pid that is no longer alive; or, with
no host tag (an older name), its pid is not alive here and it was last written STALE_PID_GRACE_S before this
run started (a writer on another node of a shared file system, whose pid means nothing here, is not raced);
or it was last written more than STALE_AGE_S before this run started (whoever wrote it, nobody is writing it
any more). A temp file of a live concurrent run is kept, and so is a fresh one from another host.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from bench.atomic import TEMP_NAME, host_tag, pid_alive, temp_path
from bench.errors import BenchError

MIN_FREE_MB = 100          # records, manifests, CSVs and plots of a micro run need a few MB; refuse below this
STALE_PID_GRACE_S = 60.0
STALE_AGE_S = 6 * 3600.0


def check_writable(path, what: str = "output folder", flag: str = "--output DIR (or $BENCH_OUTPUT)",
                   min_free_mb: float = MIN_FREE_MB) -> Path:
    """The folder `path` (or, while it does not exist, the nearest folder above it, where it will be created) is
    a folder, can be written and has `min_free_mb` free. Nothing is left behind (a probe file is written and
    removed; a missing folder is not created)."""
    path = Path(path).expanduser().absolute()
    fix = f"give a writable folder with {flag}"
    if path.exists() and not path.is_dir():
        raise BenchError(f"{what} {path} is a file, not a folder: {fix}")
    base = path
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise BenchError(f"{what} {path} cannot be created: {base} is a file, not a folder: {fix}")
    probe = temp_path(base / ".bench-write-probe")
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
    except OSError as e:
        where = "" if base == path else f" (its folder {base} cannot be written)"
        raise BenchError(f"{what} {path} is not writable ({e.strerror or e}){where}: {fix}") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    free_mb = shutil.disk_usage(base).free / 2**20
    if free_mb < min_free_mb:
        raise BenchError(f"{what} {path} has only {free_mb:.0f} MB free (at least {min_free_mb:.0f} MB needed): "
                         f"free space there, or {fix}")
    return path


def clean_temp_files(folders, run_start: float | None = None, log=None) -> list:
    """Remove the temp files a dead writer left under `folders` (see the module's docstring). Returns them."""
    run_start = time.time() if run_start is None else run_start
    removed, here = [], host_tag()
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for p in folder.rglob("*.tmp"):
            m = TEMP_NAME.match(p.name)
            try:
                mtime = p.stat().st_mtime
            except OSError:
                continue
            if m is None:
                dead = False
            elif m.group(1) is None:       # no host tag: the pid may belong to another node
                dead = not pid_alive(int(m.group(2))) and mtime < run_start - STALE_PID_GRACE_S
            else:
                dead = m.group(1) == here and not pid_alive(int(m.group(2)))
            if dead or mtime < run_start - STALE_AGE_S:
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    if removed and log:
        log(f"removed {len(removed)} temp file{'s' if len(removed) > 1 else ''} left by a killed writer: "
            + ", ".join(str(p) for p in removed[:3]) + (" ..." if len(removed) > 3 else ""))
    return removed
