"""What every task's micro generator shares: writing a data set folder atomically, so an interrupted
generation (even kill -9) never leaves a half data set that a later run would trust."""
from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable

from bench.atomic import pid_alive

MARKER = "README.txt"   # every generator writes it last-but-not-least; a folder without it is not trusted


def clean_stale_tmp(final: Path, max_age_s: float = 3600.0) -> None:
    """Remove temp folders of interrupted generations (dead process on this host, or older than an hour)."""
    host = socket.gethostname()
    for p in final.parent.glob(f".{final.name}.tmp-*"):
        parts = p.name[len(final.name) + 6:].rsplit("-", 2)   # host, pid, random
        stale = True
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit():
            stale = not pid_alive(int(parts[1]))
        else:
            try:
                stale = time.time() - p.stat().st_mtime > max_age_s
            except FileNotFoundError:
                continue
        if stale:
            shutil.rmtree(p, ignore_errors=True)


def generate_atomically(final: Path, generate: Callable[[Path], None]) -> None:
    """Run `generate(tmp_folder)` and rename the folder into place at the end (the folder appears complete
    or not at all). A final folder without the marker file (copied by hand and cut short) is replaced."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(final)
    if final.exists() and not (final / MARKER).is_file():
        bad = final.with_name(f".{final.name}.bad-{uuid.uuid4().hex[:8]}")
        os.replace(final, bad)
        shutil.rmtree(bad, ignore_errors=True)
    if final.exists():
        return
    tmp = final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        generate(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MARKER).is_file():   # not a concurrent writer that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def micro_folder(cache_dir: Path, name: str, identity: dict) -> Path:
    """`<cache>/data/<name>_micro-<hash>`: the hash covers everything that shapes the generated data
    (settings, generator version, scene description), so a change starts a new folder."""
    import hashlib
    import json
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir) / "data" / f"{name}_micro-{h}"
