"""Files written so that a crash (even kill -9) leaves the old file or the new one, never half of one; and
whether a process that left a marker behind is still alive."""
from __future__ import annotations

import hashlib
import os
import re
import socket
import uuid
from pathlib import Path
from typing import Callable


# A temp file's name says which process wrote it: `.<name>.<host>-<pid>.<random>.tmp`, <host> being 8 hex digits
# of this host's name. A later run on the same host may then remove it as soon as that pid is dead; one from
# another host (a shared file system) is judged by its age only (bench.outputs.clean_temp_files).
TEMP_NAME = re.compile(r"^\..+\.(?:([0-9a-f]{8})-)?(\d+)\.[0-9a-f]+\.tmp$")


def host_tag() -> str:
    """8 hex digits naming this host in temp file names."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_path(path) -> Path:
    """A temp name next to `path` that no other process or thread uses: `.<name>.<host>-<pid>.<random>.tmp`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{host_tag()}-{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path, write: Callable, binary: bool = True) -> Path:
    """`write(f)` into a temp file beside `path` (unique per process and call: concurrent writers never share
    it), fsync, then rename it over `path`; the temp file is removed if anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def pid_alive(pid: int) -> bool:
    """Is process `pid` alive on this host (a process of another user counts as alive)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
