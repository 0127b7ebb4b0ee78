"""Finding and reading checkpoint files (the paper profile's official weights), with errors that name the file.

A checkpoint is
  - one file: a pickle (.pth / .pt / .bin / .ckpt, read with torch.load(weights_only=True)) holding a state
    dict, bare or under a `model` / `state_dict` / `module` key (training scripts save {"model": ..., "epoch":
    ...}); a TorchScript archive (OpenAI CLIP's release) gives its state dict; or a .safetensors file;
  - or a folder as transformers' `save_pretrained` writes it: model.safetensors, or the shards
    model-0000i-of-0000n.safetensors named by model.safetensors.index.json, or pytorch_model.bin, or the .bin
    shards named by pytorch_model.bin.index.json (safetensors first, as transformers reads them).

  checkpoint_files(path)      -> the files the loader will read (pre-flight: nothing is read but an index JSON)
  load_state_dict(path)       -> {key: tensor} of all of them (a truncated or foreign file names itself)
  check_matches(model, state, arch, source, ...) -> keys and shapes against `model.state_dict()` after the
                                 adapter's key mapping; a mismatch lists the first few of each kind.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch

from bench.errors import BenchError, MissingData

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
WRAPPER_KEYS = ("model", "state_dict", "module")

LAYOUT = """\
  one file: <name>.pth / .pt / .bin (torch.save of a state dict, bare or under "model" / "state_dict") or
            <name>.safetensors
  or a transformers folder (save_pretrained):
    <folder>/model.safetensors
    <folder>/model-00001-of-0000N.safetensors ... + <folder>/model.safetensors.index.json
    <folder>/pytorch_model.bin  (or pytorch_model-0000i-of-0000N.bin + pytorch_model.bin.index.json)"""

HOW = ("Put the released checkpoint there, or point --checkpoints DIR (or BENCH_CHECKPOINTS) at the folder that "
       "holds it. Nothing is downloaded at run time.")

# folder layouts in transformers' order of preference: (single file, index of shards)
_FOLDER_LAYOUTS = (("model.safetensors", "model.safetensors.index.json"),
                   ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def checkpoint_files(path, what: str = "checkpoint", expected: str | None = None) -> list[Path]:
    """The files `load_state_dict(path)` will read, in order. Raises MissingData (nothing there, an empty
    folder, an index naming an absent shard) or BenchError (an empty or cut file, an unreadable index) naming
    the path. Cheap: besides an index JSON only the safetensors headers and the zip directories of torch
    pickles are read, which is enough to see a truncated download. `expected`: the family's own layout text
    for the error (default: the generic one above)."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif not path.is_dir():
        raise MissingData(what, path, expected or LAYOUT, HOW)
    else:
        files = None
        for single, index in _FOLDER_LAYOUTS:
            if (path / single).is_file():
                files = [path / single]
                break
            if (path / index).is_file():
                files = _shards(path / index, what)
                break
        if files is None:
            present = sorted(p.name for p in path.iterdir())[:8]
            found = f"The folder holds: {', '.join(present)}." if present else "The folder is empty."
            raise MissingData(f"{what} (weights in the folder {path})", path, LAYOUT, f"{found} {HOW}")
    for f in files:
        why = _cut(f)
        if why:
            raise BenchError(f"cannot read checkpoint file {f}: it {why}: re-download it.")
    return files


def _cut(f: Path) -> str | None:
    """Why `f` is visibly incomplete (None if it looks whole): empty; a safetensors header that does not parse
    or whose tensors end past the end of the file; a torch zip archive without its central directory."""
    import struct
    import zipfile
    size = f.stat().st_size
    if size == 0:
        return "is empty (0 bytes): an interrupted download?"
    with open(f, "rb") as fh:
        head = fh.read(8)
        if f.suffix == ".safetensors":
            if len(head) < 8:
                return "is truncated or not a safetensors file (shorter than its 8-byte header length)"
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                return (f"is truncated or not a safetensors file (its header claims {n} bytes, the file has "
                        f"{size} in all)")
            try:
                header = json.loads(fh.read(n))
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                return "is truncated or not a safetensors file (its header is not the safetensors JSON)"
            if 8 + n + end > size:
                return (f"is truncated or not a safetensors file (its tensors end at byte {8 + n + end}, the file "
                        f"has {size})")
            return None
    if head[:4] == b"PK\x03\x04" and not zipfile.is_zipfile(f):
        return "is truncated or not a torch checkpoint (a zip archive without its central directory)"
    return None


def _read_index(index: Path) -> dict:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("weight_map is empty or not an object")
        return weight_map
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise BenchError(f"{index} is not a valid shard index ({type(e).__name__}: {e}); it must be JSON with a "
                         "'weight_map' {tensor name: shard file}. Download the checkpoint folder again.") from e


def _shards(index: Path, what: str) -> list[Path]:
    names = list(dict.fromkeys(_read_index(index).values()))
    files = [index.parent / n for n in sorted(names)]
    absent = [f for f in files if not f.is_file()]
    if absent:
        raise MissingData(f"{what} shard {absent[0].name}", absent[0],
                          "  every shard named in the index:\n" + "\n".join(f"  {f}" for f in files),
                          f"{index.name} names {len(files)} shard(s) and {len(absent)} "
                          f"({', '.join(f.name for f in absent[:4])}) are missing: download them too.")
    return files


def _read_file(f: Path) -> dict:
    if f.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(f))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise BenchError(f"cannot read checkpoint file {f} ({e}): it is truncated or not a safetensors file: re-download it.") from e
    import pickle
    import zipfile
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise BenchError(f"checkpoint file {f} holds pickled Python objects other than tensors, which "
                             "torch.load(weights_only=True) refuses (nothing is unpickled unsafely): re-save it "
                             "as torch.save(model.state_dict(), ...) or as .safetensors.") from e
        raise BenchError(f"cannot read checkpoint file {f} ({e}): it is truncated or not a torch checkpoint: "
                         "re-download it.") from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        if zipfile.is_zipfile(f):        # a TorchScript archive (OpenAI's CLIP release): its state dict
            try:
                return torch.jit.load(str(f), map_location="cpu").state_dict()
            except Exception:  # noqa: BLE001 - any failure: report the first error below
                pass
        raise BenchError(f"cannot read checkpoint file {f} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                         "): it is truncated or not a torch checkpoint: re-download it.") from e
    return _unwrap(obj, f)


def _unwrap(obj, f: Path) -> dict:
    for _ in range(3):       # {"model": {...}}, {"state_dict": {...}}, {"module": {...}}, nested once or twice
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise BenchError(f"checkpoint file {f} holds a {type(obj).__name__}, not a state dict: save "
                         "model.state_dict() (bare or under a 'model' key).")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise BenchError(f"checkpoint file {f} holds no tensors (top-level keys: {sorted(map(str, obj))[:8]}): "
                         "save model.state_dict() (bare or under a 'model' / 'state_dict' key).")
    return tensors


def load_state_dict(path, what: str = "checkpoint", expected: str | None = None) -> dict:
    """All tensors of the checkpoint at `path` (file or folder, see the module doc), on CPU. A wrapper key
    (`model` / `state_dict` / `module`) is unwrapped and a DDP "module." prefix on every key is dropped.
    A truncated, corrupt or foreign file -> BenchError naming the file; a shard that lacks a tensor its
    index names -> BenchError naming both."""
    path = Path(path)
    files = checkpoint_files(path, what, expected)
    state: dict = {}
    for f in files:
        state.update(_read_file(f))
    if path.is_dir() and len(files) > 1:
        index = next(path / i for _, i in _FOLDER_LAYOUTS if (path / i).is_file())
        lost = [k for k in _read_index(index) if k not in state]
        if lost:
            raise BenchError(f"{index} names tensors that no shard holds ({', '.join(lost[:3])}, {len(lost)} in all): "
                             "the shards are from another download; download the folder again.")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _fmt(keys: list, n: int = 5) -> str:
    more = f" ... ({len(keys)} in all)" if len(keys) > n else ""
    return f"{keys[:n]}{more}"


def check_matches(model: torch.nn.Module, state: dict, arch: str, source, *,
                  optional: Iterable[str] | Callable[[str], bool] = (), optional_buffers: bool = False,
                  hint: str = "") -> list[str]:
    """Compare `state` (already in the model's key names: after the adapter's mapping) with
    `model.state_dict()`: shapes, keys of the model the checkpoint lacks, keys of the checkpoint the model has
    no place for. Tolerated: missing keys matching `optional` (key prefixes, or a predicate), and with
    `optional_buffers` every missing buffer (e.g. retrieval queues). Raises BenchError "checkpoint <source>
    does not match architecture <arch>: first mismatches: ..." listing the first few of each kind; returns
    the tolerated missing keys (the caller logs or ignores them)."""
    own = model.state_dict()
    if callable(optional):
        may_miss = optional
    else:
        prefixes = tuple(optional)
        may_miss = lambda k: bool(prefixes) and k.startswith(prefixes)  # noqa: E731
    buffers = {n for n, _ in model.named_buffers()} if optional_buffers else set()
    shapes = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    tolerated = [k for k in missing if may_miss(k) or k in buffers]
    missing = [k for k in missing if k not in set(tolerated)]
    unexpected = [k for k in state if k not in own]
    if shapes or missing or unexpected:
        parts = []
        if shapes:
            parts.append("first mismatches (shapes differ): " + ", ".join(
                f"{k} (checkpoint shape {tuple(state[k].shape)} vs model {tuple(own[k].shape)})" for k in shapes[:4])
                + (f" ... ({len(shapes)} in all)" if len(shapes) > 4 else ""))
        if missing:
            parts.append(f"missing keys {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_fmt(sorted(unexpected))}")
        raise BenchError(f"checkpoint {source} does not match architecture {arch}: {'; '.join(parts)}{hint}. "
                         f"Use the checkpoint released for {arch}, or set the card's model / model_config to the "
                         "checkpoint's architecture.")
    return tolerated
