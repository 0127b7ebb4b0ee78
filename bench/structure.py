"""Prunable structure, generic extraction and the pruned-checkpoint manifest.

A model adapter describes its model as a list of *unit groups* ("blocks.3.attn: 64 head-dim units").
Each group lists the weight slices each unit owns: a `Slice` says that dimension `dim` of a parameter,
viewed as the shape `view`, has its units along axis `axis` of that view. Examples for timm's fused
qkv weight of shape (3*H*dh, d):
  head-dim units  -> Slice("blocks.3.attn.qkv.weight", 0, (3, H, dh), 2)
  whole heads     -> Slice("blocks.3.attn.qkv.weight", 0, (3, H, dh), 1)
Several groups may cut the same dimension (heads and head-dims together, as GOHSP does); their keep
masks are combined with AND on the shared view. Hidden-width groups cut every tensor of the residual
stream in one group; whole-sublayer groups (kind "layer") own no slice and are removed by the adapter.

Methods only ever see groups and keep-masks, never module names. `extract` turns keep-masks into a
physically smaller model that runs with its normal forward; `save_manifest`/`load_manifest` store it
as JSON (architecture id, kept indices, shapes) plus safetensors, with no pickles.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from bench.atomic import atomic_write, temp_path

from bench.errors import ManifestError

UNIT_KINDS = ("head_dim", "head", "ffn", "hidden", "layer")
MANIFEST_FORMAT = "bench.pruned/1"


@dataclass(frozen=True)
class Slice:
    param: str
    dim: int
    view: tuple
    axis: int

    def units(self) -> int:
        return self.view[self.axis]


@dataclass
class UnitGroup:
    name: str
    kind: str
    module: str
    size: int
    slices: tuple
    layer: int | None = None
    modality: str = "vision"
    params_per_unit: int = 0
    min_keep: int = 1
    params: tuple = ()          # kind "layer": names of the parameters the whole sublayer owns

    def __post_init__(self):
        if self.kind not in UNIT_KINDS:
            raise ValueError(f"unit kind {self.kind!r} not in {UNIT_KINDS}")
        for s in self.slices:
            if s.units() != self.size:
                raise ValueError(f"{self.name}: slice {s.param} has {s.units()} units, group has {self.size}")


@dataclass
class Structure:
    groups: list = field(default_factory=list)

    def __iter__(self):
        return iter(self.groups)

    def __len__(self):
        return len(self.groups)

    def by_name(self) -> dict:
        return {g.name: g for g in self.groups}

    def of_kind(self, *kinds: str) -> "Structure":
        return Structure([g for g in self.groups if g.kind in kinds])

    def kinds(self) -> list:
        return sorted({g.kind for g in self.groups})

    def full_keep(self) -> dict:
        return {g.name: torch.ones(g.size, dtype=torch.bool) for g in self.groups}


def fill_params_per_unit(model: nn.Module, structure: Structure) -> Structure:
    """params_per_unit = parameters one unit owns, summed over its slices (exact, biases included)."""
    params = dict(model.named_parameters())
    for g in structure:
        if g.kind == "layer" and g.params:     # a whole sublayer: it owns its parameters, not slices
            g.params_per_unit = sum(params[n].numel() for n in g.params if n in params)
        else:
            g.params_per_unit = sum(params[s.param].numel() // g.size for s in g.slices)
    return structure


# ---------------------------------------------------------------------------------------------
# keep-masks -> per-parameter index sets

def _check_keep(structure: Structure, keep: dict) -> dict:
    groups = structure.by_name()
    unknown = set(keep) - set(groups)
    if unknown:
        raise KeyError(f"keep-masks for unknown groups: {sorted(unknown)[:5]}")
    out = {}
    for name, g in groups.items():
        k = keep.get(name)
        k = torch.ones(g.size, dtype=torch.bool) if k is None else torch.as_tensor(k).to("cpu").bool()
        if k.shape != (g.size,):
            raise ValueError(f"keep-mask of {name} has shape {tuple(k.shape)}, expected ({g.size},)")
        if int(k.sum()) < min(g.min_keep, g.size) and g.kind != "layer":
            raise ValueError(f"{name} keeps {int(k.sum())} units; at least {g.min_keep} must stay")
        out[name] = k
    return out


def _dim_keeps(structure: Structure, keep: dict) -> dict:
    """(param, dim) -> boolean vector over that dim (AND of every group that cuts it)."""
    views: dict = {}
    masks: dict = {}
    for g in structure:
        k = keep[g.name]
        for s in g.slices:
            key = (s.param, s.dim)
            if key in views and views[key] != tuple(s.view):
                raise ValueError(f"groups cut {s.param} dim {s.dim} with different views {views[key]} vs {s.view}")
            views[key] = tuple(s.view)
            shape = [1] * len(s.view)
            shape[s.axis] = s.view[s.axis]
            m = k.view(shape).expand(s.view)
            masks[key] = m if key not in masks else masks[key] & m
    return {key: m.reshape(-1) for key, m in masks.items()}


def param_masks(model: nn.Module, structure: Structure, keep: dict) -> dict:
    """Float 0/1 masks shaped like each touched parameter (1 = kept). Used to zero pruned weights."""
    keep = _check_keep(structure, keep)
    params = dict(model.named_parameters())
    out: dict = {}
    for (pname, dim), vec in _dim_keeps(structure, keep).items():
        p = params[pname]
        shape = [1] * p.dim()
        shape[dim] = p.shape[dim]
        m = vec.to(p.device, p.dtype).view(shape)
        out[pname] = m if pname not in out else out[pname] * m
    return out


@torch.no_grad()
def apply_param_masks(model: nn.Module, masks: dict) -> None:
    params = dict(model.named_parameters())
    for name, m in masks.items():
        params[name].mul_(m)


def mask_weights(model: nn.Module, structure: Structure, keep: dict) -> dict:
    """Zero the weights owned by pruned units (the "masked dense model"); returns the masks used.

    For head-dim, head and FFN units this is exactly equivalent to extraction (a zeroed q/k/v row adds 0
    to every q.k product and a zeroed fc1 row gives GELU(0)=0). Hidden-width units are not: norms see
    the zeros. Those need the adapter's activation masks instead."""
    masks = param_masks(model, structure, keep)
    apply_param_masks(model, masks)
    return masks


def kept_param_count(model: nn.Module, structure: Structure, keep: dict) -> dict:
    """Exact parameter counts after extraction, without extracting: {'total', 'prunable', 'removed'}."""
    keep = _check_keep(structure, keep)
    params = dict(model.named_parameters())
    kept_by_param = {name: p.numel() for name, p in params.items()}
    per_param_dims: dict = {}
    for (pname, dim), vec in _dim_keeps(structure, keep).items():
        per_param_dims.setdefault(pname, {})[dim] = int(vec.sum())
    prunable_names = set(per_param_dims) | {n for g in structure if g.kind == "layer" for n in g.params}
    for pname, dims in per_param_dims.items():
        shape = list(params[pname].shape)
        for dim, n in dims.items():
            shape[dim] = n
        kept_by_param[pname] = math.prod(shape)
    removed_layers = [g for g in structure if g.kind == "layer" and not bool(keep[g.name].any())]
    # a removed sublayer takes its parameters as the other groups left them (heads, hidden dims cut too)
    layer_removed = sum(sum(kept_by_param[n] for n in g.params if n in kept_by_param) if g.params
                        else g.params_per_unit for g in removed_layers)
    total = sum(kept_by_param.values()) - layer_removed
    dense_total = sum(p.numel() for p in params.values())
    prunable_dense = sum(params[n].numel() for n in prunable_names)
    return {"total": total, "dense_total": dense_total, "removed": dense_total - total,
            "prunable_dense": prunable_dense}


# ---------------------------------------------------------------------------------------------
# extraction

@torch.no_grad()
def extract(model: nn.Module, adapter, structure: Structure, keep: dict, options: dict | None = None) -> nn.Module:
    """Physically slice `model` in place following the keep-masks and let the adapter fix module configs.

    Returns the model. Parameters not cut by any group are untouched; the optimizer state of the old
    model is meaningless afterwards (build a new optimizer)."""
    keep = _check_keep(structure, keep)
    params = dict(model.named_parameters())
    new_tensors: dict = {}
    for (pname, dim), vec in _dim_keeps(structure, keep).items():
        t = new_tensors.get(pname, params[pname].data)
        idx = torch.nonzero(vec, as_tuple=False).view(-1).to(t.device)
        new_tensors[pname] = t.index_select(dim, idx).contiguous()
    for pname, t in new_tensors.items():
        mod_name, _, attr = pname.rpartition(".")
        mod = model.get_submodule(mod_name)
        old = mod._parameters[attr]
        mod._parameters[attr] = nn.Parameter(t, requires_grad=old.requires_grad)
    _sync_standard_modules(model)
    adapter.fix_modules(model, structure, keep, options or {})
    return model


def _sync_standard_modules(model: nn.Module) -> None:
    """Update the size attributes of torch's own modules after their parameters were sliced."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.LayerNorm) and mod.weight is not None:
            mod.normalized_shape = tuple(mod.weight.shape)
        elif isinstance(mod, nn.Embedding):
            mod.num_embeddings, mod.embedding_dim = mod.weight.shape


def keep_from_indices(structure: Structure, kept: dict) -> dict:
    out = {}
    for g in structure:
        k = torch.zeros(g.size, dtype=torch.bool)
        idx = kept.get(g.name, list(range(g.size)))
        k[torch.as_tensor(idx, dtype=torch.long)] = True
        out[g.name] = k
    return out


def retention(structure: Structure, keep: dict) -> list:
    """Per group: kind, layer, modality, kept/size (for retention reports)."""
    return [{"group": g.name, "kind": g.kind, "layer": g.layer, "modality": g.modality,
             "kept": int(keep[g.name].sum()), "size": g.size} for g in structure]


# ---------------------------------------------------------------------------------------------
# manifest (portable pruned checkpoint)

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_manifest(directory, model: nn.Module, arch: str, config: dict, structure: Structure, keep: dict,
                  options: dict | None = None, extra: dict | None = None) -> Path:
    """Write <directory>/manifest.json + model.safetensors atomically (a reader never sees half a file)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keep = _check_keep(structure, keep)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp_w = temp_path(directory / "model.safetensors")   # unique: writers may race
    save_file(state, str(tmp_w))
    manifest = {
        "format": MANIFEST_FORMAT,
        "arch": arch,
        "config": config,
        "groups": {g.name: {"kind": g.kind, "size": g.size, "kept": torch.nonzero(keep[g.name]).view(-1).tolist()}
                   for g in structure},
        "extract_options": options or {},
        "shapes": {k: list(v.shape) for k, v in state.items()},
        "weights": "model.safetensors",
        "weights_sha256": _sha256(tmp_w),
        "extra": extra or {},
    }
    os.replace(tmp_w, directory / "model.safetensors")
    write_json_atomic(directory / "manifest.json", manifest)
    return directory


def load_manifest(directory, device="cpu"):
    """Rebuild a pruned model from its manifest: base architecture on `meta`, extraction, then weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from bench.registry import MODELS

    directory = Path(directory)
    mpath = directory / "manifest.json"
    if not mpath.is_file():
        raise ManifestError(f"no manifest.json in {directory}: a pruned checkpoint is a folder with "
                            "manifest.json and model.safetensors, as written by `save_manifest`.")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{mpath} is not valid JSON ({e}); the file is corrupt: re-export the pruned model.")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{mpath}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}.")
    wpath = directory / manifest.get("weights", "model.safetensors")
    if not wpath.is_file():
        raise ManifestError(f"weights file {wpath} named by {mpath} is missing.")
    if _sha256(wpath) != manifest.get("weights_sha256"):
        raise ManifestError(f"{wpath} does not match the sha256 in {mpath}: the weights are corrupt or "
                            "belong to another manifest. Re-export the pruned model.")
    adapter_cls, base_cfg = MODELS.get(manifest["arch"])
    adapter = adapter_cls(manifest["arch"], manifest.get("config") or base_cfg)
    with torch.device("meta"):
        model = adapter.build()
    structure = adapter.structure(model)
    groups = structure.by_name()
    missing = set(manifest["groups"]) - set(groups)
    if missing:
        raise ManifestError(f"{mpath} names groups the architecture {manifest['arch']} does not have: "
                            f"{sorted(missing)[:5]}")
    for name, info in manifest["groups"].items():
        if groups[name].size != info["size"] or any(not 0 <= i < info["size"] for i in info["kept"]):
            raise ManifestError(f"{mpath}: group {name} does not match the architecture "
                                f"(size {info['size']} vs {groups[name].size}).")
    keep = keep_from_indices(structure, {n: i["kept"] for n, i in manifest["groups"].items()})
    extract(model, adapter, structure, keep, manifest.get("extract_options"))
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError) as e:
        raise ManifestError(f"{wpath} cannot be read as safetensors ({e}).")
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    got = {k: list(v.shape) for k, v in state.items()}
    if expected != got:
        diff = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
        raise ManifestError(f"weights in {wpath} do not fit the pruned architecture of {mpath}: "
                            f"{len(diff)} tensors differ, e.g. {diff[:3]} "
                            f"(expected {[expected.get(k) for k in diff[:3]]}, got {[got.get(k) for k in diff[:3]]}).")
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ManifestError(f"tensors not stored in {wpath}: {leftover[:5]}")
    return model.to(device), manifest


def write_json_atomic(path, obj) -> None:
    """Write JSON so that a crash (even kill -9) leaves either the old file or the new one, never half."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=1, sort_keys=False, default=_json_default), binary=False)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def iter_groups(structure: Structure, kinds: Iterable[str]):
    kinds = set(kinds)
    return [g for g in structure if g.kind in kinds]
