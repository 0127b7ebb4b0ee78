"""Reading the files of a real data set with errors that name the file, early.

  scan_images(paths, what)      at prepare (paper profile, a user's folder): every image opens (PIL header),
                                a JPEG ends with its end-of-image marker FF D9 and a PNG with its IEND chunk
                                (only the last bytes are read; a thread pool, so ImageNet's 1.28M files take
                                seconds to minutes, not hours). The first bad file -> BenchError
                                "<path>: truncated or unreadable image (<reason>); replace or remove it".
  load_image(path, mode)        the per-image decoder of the training / evaluation loaders: a decode error that
                                slipped past the scan still names the file (BenchError, picklable across
                                DataLoader workers).
  read_json(path, what)         UTF-8 decode and JSON syntax errors -> BenchError naming the file (and the line).
  require_fields(records, path, fields, what)
                                a record without a required field (or of the wrong type) -> BenchError naming
                                the file, the record index and the field.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from bench.errors import BenchError, MissingData

_TAIL = 1024                       # bytes read from the end of each file
_PNG_END = b"IEND\xaeB`\x82"       # the IEND chunk type + its CRC
_CHUNK = 4096                      # files per batch of the thread pool (first bad file reported in order)


def image_problem(path) -> str | None:
    """Why `path` is not a complete image (None when it is): the header must open with PIL; a JPEG must end
    with FF D9 (trailing padding allowed; otherwise it must decode in full: some writers append data after
    the marker) and a PNG with its IEND chunk. Reads the header and the last bytes only."""
    from PIL import Image, ImageFile, UnidentifiedImageError
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "file not found"
    except OSError as e:
        return f"cannot stat: {e.strerror or e}"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(path) as im:
            fmt = im.format
    except UnidentifiedImageError:
        return "not an image PIL can identify"
    except (OSError, ValueError, SyntaxError) as e:   # PIL raises SyntaxError for some broken headers
        return f"unreadable header: {e}"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, size - _TAIL))
            tail = f.read()
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    if fmt == "JPEG":
        if tail.rstrip(b"\x00\r\n\t \xff").endswith(b"\xff\xd9"):
            return None
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            return "no JPEG end-of-image marker (FF D9) at the end: the file is cut"
        try:                        # rare: data after the marker (camera trailers); a full decode decides
            with Image.open(path) as im:
                im.load()
            return None
        except (OSError, ValueError, SyntaxError) as e:
            return f"no JPEG end-of-image marker (FF D9) at the end: the file is cut ({e})"
    if fmt == "PNG" and _PNG_END not in tail:
        return "no PNG IEND chunk at the end: the file is cut"
    return None


def _stat(p) -> bytes:
    try:
        st = os.stat(p)
        return f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode("utf-8", "surrogateescape")
    except OSError:
        return f"{p}\0?\0".encode("utf-8", "surrogateescape")


def _signature(paths: list, pool) -> str:
    """Identity of a file list: every path with its size and modification time (a file cut or replaced in
    place changes them). One stat per file: several times cheaper than the scan it saves."""
    h = hashlib.sha256()
    for i in range(0, len(paths), _CHUNK):
        for b in pool.map(_stat, paths[i:i + _CHUNK]):
            h.update(b)
    return h.hexdigest()


def scan_images(paths: Iterable, what: str, stamp: Path | None = None, workers: int | None = None,
                layout: str | None = None, processes: bool | None = None) -> None:
    """Check every image of `paths` (see `image_problem`); the first bad one in the given order -> BenchError
    "<path>: truncated or unreadable image (<reason>); replace or remove it". `what` names the data set in the
    message ("the ImageNet images"); a missing file -> MissingData (with `layout`, the expected layout).
    With `stamp` (a file under the cache), a successful scan is remembered for the same files, sizes and
    modification times, so later runs skip it (one stat per file instead of the scan).
    PIL's header parsing holds the GIL, so a long list (ImageNet) is checked by one process per core
    (`processes`: None = when there are more than PROCESS_MIN files and more than 2 cores); threads otherwise."""
    paths = [Path(p) for p in paths]
    sig = None
    cores = os.cpu_count() or 1
    workers = workers or min(32, 4 * cores)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        if stamp is not None:
            sig = _signature(paths, pool)
            try:
                if Path(stamp).read_text() == sig:
                    return
            except OSError:
                pass
        if processes is None:
            processes = len(paths) > PROCESS_MIN and cores > 2
        done = False
        if processes:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            from concurrent.futures.process import BrokenProcessPool
            try:
                with ProcessPoolExecutor(max_workers=min(cores, 32),
                                         mp_context=multiprocessing.get_context("spawn")) as procs:
                    _report(paths, what, layout, lambda chunk: procs.map(image_problem, chunk, chunksize=64))
                done = True
            except (BrokenProcessPool, OSError):   # no worker processes here (e.g. an interactive __main__)
                pass
        if not done:
            _report(paths, what, layout, lambda chunk: pool.map(image_problem, chunk))
    if stamp is not None:
        try:
            Path(stamp).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(stamp).with_name(f".{Path(stamp).name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
            tmp.write_text(sig)
            tmp.replace(stamp)
        except OSError:
            pass                   # a read-only cache only costs a rescan


PROCESS_MIN = 50_000


def _report(paths: list, what: str, layout: str | None, check) -> None:
    for i in range(0, len(paths), _CHUNK):
        chunk = paths[i:i + _CHUNK]
        for p, why in zip(chunk, check(chunk)):
            if why == "file not found":
                raise MissingData(f"image {p.name} ({what})", p, layout or f"  {p}",
                                  "Put it there, or remove what names it (the annotation entry); checked "
                                  "before any training.")
            if why:
                raise BenchError(f"{p}: truncated or unreadable image ({why}); replace or remove it "
                                 f"(found checking {what} before any training).")


def load_image(path, mode: str | None = "RGB"):
    """Decode one image in full (PIL, converted to `mode` unless None); any decode error -> BenchError
    naming the file. A module-level function: usable as torchvision's ImageFolder `loader` in workers."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode) if mode else im.copy()
    except FileNotFoundError as e:
        raise BenchError(f"{path}: image not found ({e.strerror}): put it back or remove it from the data set.") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BenchError(f"{path}: truncated or unreadable image ({e}); replace or remove it.") from e


def read_json(path, what: str, layout: str | None = None):
    """The parsed JSON of `path`: a missing file -> MissingData; bytes that are not UTF-8 and JSON syntax
    errors -> BenchError naming the file (the line and column for syntax errors) and the fix."""
    path = Path(path)
    if not path.is_file():
        raise MissingData(what, path, layout or f"  {path}", "Put the file there (see the README for its source).")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")         # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise BenchError(f"{path} is not UTF-8 text ({what}): byte 0x{raw[e.start]:02x} at offset {e.start} "
                         f"(line {line}) cannot be decoded. JSON files are UTF-8: re-download the file, or "
                         "convert it (e.g. iconv -f latin1 -t utf-8).") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        lines = text.splitlines()
        src = lines[e.lineno - 1][max(0, e.colno - 60):e.colno + 60] if 0 < e.lineno <= len(lines) else ""
        raise BenchError(f"{path} is not valid JSON ({what}): {e.msg} at line {e.lineno}, column {e.colno}: "
                         f"{src!r}. The file is corrupt or truncated: download it again."
                         + (f" Expected layout:\n{layout}" if layout else "")) from e


def _type_name(typ) -> str:
    if isinstance(typ, tuple):
        return " or ".join(t.__name__ for t in typ)
    return typ.__name__


def require_fields(records, path, fields: dict, what: str, layout: str | None = None) -> None:
    """`records` is a list of JSON objects, each with every field of `fields` ({name: type or tuple of
    types}); the first offence -> BenchError naming the file, the record index and the field."""
    tail = f" Expected layout:\n{layout}" if layout else ""
    if not isinstance(records, list):
        raise BenchError(f"{path} ({what}): expected a JSON list of records, got a {type(records).__name__}.{tail}")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise BenchError(f"{path} ({what}): record {i} is a {type(rec).__name__}, not a JSON object: "
                             f"{json.dumps(rec, default=str)[:120]}.{tail}")
        for name, typ in fields.items():
            if name not in rec:
                raise BenchError(f"{path} ({what}): record {i} has no field {name!r} "
                                 f"({json.dumps(rec, default=str)[:120]}). Fix or remove that record, or use the "
                                 f"released annotation file.{tail}")
            if not isinstance(rec[name], typ) or (typ is int and isinstance(rec[name], bool)):
                raise BenchError(f"{path} ({what}): record {i} field {name!r} is a {type(rec[name]).__name__}, "
                                 f"expected {_type_name(typ)} ({json.dumps(rec, default=str)[:120]}).{tail}")
