"""Shared machinery of the transformers language adapters (models/bert.py, gpt2.py, llama.py).

Activation masks are forward hooks on the model's own modules, described by a per-family list of `Site`s:
  Site(group, module, where, mode, folds)
    where = "out"  : multiply the module's output      (forward hook)
            "in"   : multiply the module's first input (forward pre-hook)
            "norm" : hand the (hidden) mask to a mask-aware norm (statistics over the kept dims only)
    mode  = "inner": the last dim is (n, u) with u = mask size, the mask repeats n times (hidden, ffn, head_dim
                     tiled over heads, a layer gate with u = 1)
            "outer": the last dim is (u, n), each unit owns n consecutive entries (heads before o_proj)
            "support": multiply by (mask != 0) only (norm outputs, pooler); nothing to fold
    folds = [(param name, dim)] where a deterministic mask value can be multiplied into the weights.
A mask is a tensor whose last dim is the group size; leading dims broadcast against (batch, tokens), so
per-token sampled masks (B, T, size) work too (hidden/ffn/head/layer; head_dim masks are (size,)).

Masks are kept on the hooked modules (and listed in `model._unit_masks`); hooks read them at call time, so
`set_unit_masks` only swaps tensors, and a deep copy of a masked model is independent. Hooks are not saved in
state dicts and are removed by `clear_unit_masks`.

`fold_masks` multiplies deterministic mask values into the weights (each (tensor, dim, group) once, so a
tied embedding/LM-head pair is scaled once, which is what the masked model computed on both ends) and
returns the keep-masks `value != 0`; extracting with them gives the unmasked model that computes what the
masked model computed (norm statistics over the kept dims are the reason the extraction is needed).

Also here: whole-sublayer groups (`layer_group`: kind "layer", size 1, no slices, `UnitGroup.params` = the
parameter names the sublayer owns, so `kept_param_count` and expected-size code can count its removal after
the other groups' cuts); `meta_safe` (a ready 4D attention mask on `meta` inputs, since transformers' mask
helpers read mask values); `tie_outputs` (a tied LM head stays out of `state_dict()`, safetensors refuses
shared tensors); `materialise_buffers` (non-persistent buffers of a model rebuilt on `meta` by load_manifest);
`read_hf_state` / `load_mapped` (transformers checkpoints: folder, sharded or single file, clear errors).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from bench.errors import BenchError
from bench.structure import Slice, UnitGroup


@dataclass
class Site:
    group: str
    module: str
    where: str            # out | in | norm
    mode: str = "inner"   # inner | outer | support
    folds: list = field(default_factory=list)


def _apply(x, m, mode):
    if mode == "support":
        if m.dim() > 1 and x.dim() < m.dim():   # per-token masks on a pooled vector: kept where kept anywhere
            m = m.reshape(-1, m.shape[-1]).ne(0).any(0)
        m, mode = (m != 0).to(x.dtype), "inner"
    m = m.to(x.dtype)
    u = m.shape[-1]
    if mode == "inner":
        return (x.unflatten(-1, (-1, u)) * m.unsqueeze(-2)).flatten(-2)
    return (x.unflatten(-1, (u, -1)) * m.unsqueeze(-1)).flatten(-2)


# ---------------------------------------------------------------------------------------------
# mask-aware norms (class-swapped in at build time; identical to the originals while no mask is set)

def _support(m, x):
    return (m != 0).to(x.dtype)


class MaskedLayerNorm(nn.LayerNorm):
    """LayerNorm whose statistics run over the dims where `unit_mask` != 0; output zero elsewhere."""
    unit_mask = None

    def forward(self, x):
        m = self.unit_mask
        if m is None:
            return super().forward(x)
        s = _support(m, x)
        n = s.sum(-1, keepdim=True)
        mean = (x * s).sum(-1, keepdim=True) / n
        var = ((x - mean) * s).pow(2).sum(-1, keepdim=True) / n
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y * s


def masked_rms_forward(self, x):
    """RMSNorm (LLaMA) over the dims where `unit_mask` != 0, in float32 as transformers does."""
    m = self.unit_mask
    dtype = x.dtype
    h = x.to(torch.float32)
    if m is None:
        var = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(var + self.variance_epsilon)).to(dtype)
    s = _support(m, h)
    var = (h.pow(2) * s).sum(-1, keepdim=True) / s.sum(-1, keepdim=True)
    return self.weight * (h * torch.rsqrt(var + self.variance_epsilon) * s).to(dtype)


_SUBCLASSES: dict = {}


def swap_class(module: nn.Module, name: str, attrs: dict):
    """Give `module` a cached subclass of its original class carrying the given methods/attributes (parameter
    names and isinstance checks unchanged). Several patches on one module merge into ONE subclass, and the
    patched methods call the original class's by name (`type(self)._bench_base.forward(self, ...)`, not
    `super(type(self), self)`, which recurses once something subclasses the patched class again, as FSDP's
    fully_shard does: bench.sharding)."""
    cls = type(module)
    base = getattr(cls, "_bench_base", cls)
    merged = {**getattr(cls, "_bench_attrs", {}), **attrs}
    names = tuple(sorted(set(getattr(cls, "_bench_names", ())) | {name}))
    key = (base, names)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type("".join(names) + base.__name__, (base,),
                                {**merged, "_bench_base": base, "_bench_attrs": merged, "_bench_names": names})
    module.__class__ = _SUBCLASSES[key]
    return module


def _meta_safe_forward(self, input_ids=None, *args, **kwargs):
    """On `meta` inputs (FLOPs counting), hand transformers a ready 4D additive mask: its own mask helpers
    inspect the mask's values (`.all()`), which meta tensors cannot answer. Numerically the same mask."""
    if args:          # positional arguments after input_ids -> keywords of the original forward
        import inspect
        names = list(inspect.signature(type(self)._bench_base.forward).parameters)[2:]
        kwargs.update(zip(names, args))
        args = ()
    ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    am = kwargs.get("attention_mask")
    if ref is not None and ref.is_meta and (am is None or am.dim() == 2):
        B, T = ref.shape[0], ref.shape[1]
        dtype = next(self.parameters()).dtype
        neg = torch.finfo(dtype).min
        mask = torch.zeros(B, 1, T, T, dtype=dtype, device=ref.device)
        if self._bench_causal:
            mask = mask + torch.full((T, T), neg, dtype=dtype, device=ref.device).triu(1)
        if am is not None:
            mask = mask + (1.0 - am[:, None, None, :].to(dtype)) * neg
        kwargs["attention_mask"] = mask
    return type(self)._bench_base.forward(self, input_ids, *args, **kwargs)


def meta_safe(model: nn.Module, causal: bool):
    model._bench_causal = causal
    return swap_class(model, "MetaSafe", {"forward": _meta_safe_forward})


def patch_norms(model: nn.Module, rms_cls=None):
    for mod in model.modules():
        if type(mod) is nn.LayerNorm:
            mod.__class__ = MaskedLayerNorm
        elif rms_cls is not None and type(mod) is rms_cls:     # (first patch only)
            swap_class(mod, "Masked", {"forward": masked_rms_forward, "unit_mask": None})


# ---------------------------------------------------------------------------------------------
# hooks

def set_masks(model: nn.Module, sites: list, masks: dict) -> None:
    """Install/replace masks. Hooks are registered once per group; later calls swap the tensors. Each hooked
    module holds its own {group: mask} dict and hook ids, so `copy.deepcopy(model)` gives an independent copy."""
    store = model.__dict__.setdefault("_unit_masks", {})
    hooked = model.__dict__.setdefault("_unit_mask_hooks", {})
    by_group: dict = {}
    for s in sites:
        by_group.setdefault(s.group, []).append(s)
    unknown = set(masks) - set(by_group)
    if unknown:
        raise BenchError(f"no mask site for group(s) {sorted(unknown)[:4]} in this model (removed sublayer, or "
                         "a group of another structure?)")
    for name, m in masks.items():
        store[name] = m
        for s in by_group[name]:
            mod = model.get_submodule(s.module)
            if s.where == "norm":
                mod.unit_mask = m
                continue
            mod.__dict__.setdefault("_bench_masks", {})[name] = m
            if name not in hooked:
                mod.__dict__.setdefault("_bench_hook_ids", []).append(_register(mod, s))
        hooked[name] = True


def _register(mod, site) -> int:
    name, mode = site.group, site.mode
    if site.where == "out":
        def hook(m_, _args, out):
            m = m_.__dict__.get("_bench_masks", {}).get(name)
            return out if m is None else _apply(out, m, mode)
        return mod.register_forward_hook(hook).id

    def pre(m_, args):
        m = m_.__dict__.get("_bench_masks", {}).get(name)
        return args if m is None else (_apply(args[0], m, mode),) + tuple(args[1:])
    return mod.register_forward_pre_hook(pre).id


def clear_masks(model: nn.Module) -> None:
    model.__dict__.pop("_unit_mask_hooks", None)
    model.__dict__.pop("_unit_masks", None)
    for mod in model.modules():
        for hid in mod.__dict__.pop("_bench_hook_ids", []):
            mod._forward_hooks.pop(hid, None)
            mod._forward_pre_hooks.pop(hid, None)
        mod.__dict__.pop("_bench_masks", None)
        if getattr(mod, "unit_mask", None) is not None:
            mod.unit_mask = None


def ones_masks(model, structure, kinds) -> dict:
    ref = next(model.parameters())
    return {g.name: torch.ones(g.size, device=ref.device, dtype=ref.dtype, requires_grad=True)
            for g in structure if g.kind in kinds}


@torch.no_grad()
def fold_masks(model: nn.Module, sites: list, values: dict) -> dict:
    """Multiply deterministic mask values into the weights; returns keep-masks (value != 0)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    done = set()
    for s in sites:
        if s.group not in values or s.mode == "support":
            continue
        v = torch.as_tensor(values[s.group]).detach()
        if v.dim() != 1:
            raise BenchError(f"fold needs one value per unit for {s.group}, got shape {tuple(v.shape)}")
        for pname, dim in s.folds:
            p = params[pname]
            key = (id(p), dim, s.group)
            if key in done:
                continue
            done.add(key)
            n = p.shape[dim] // v.numel()
            full = v.repeat(n) if s.mode == "inner" else v.repeat_interleave(n)
            shape = [1] * p.dim()
            shape[dim] = p.shape[dim]
            p.mul_(full.to(p.device, p.dtype).view(shape))
    clear_masks(model)
    return {k: torch.as_tensor(v).detach().cpu() != 0 for k, v in values.items()}


def linear_folds(prefix: str, where: str, bias: bool = True, conv1d: bool = False) -> list:
    """Weight dims a mask on a Linear's (or GPT-2 Conv1D's, weight (in, out)) output/input scales."""
    if where == "out":
        f = [(f"{prefix}.weight", 1 if conv1d else 0)]
        return f + ([(f"{prefix}.bias", 0)] if bias else [])
    return [(f"{prefix}.weight", 0 if conv1d else 1)]


# ---------------------------------------------------------------------------------------------
# structure helpers

def layer_group(prefix, sub, module, params_named, layer, names):
    """Whole-sublayer group (kind "layer", size 1, no slices); `params` lists the parameters it owns, so the
    framework counts exactly what its removal takes away (after the other groups' cuts)."""
    names = tuple(n for n in names if n in params_named)
    return UnitGroup(f"{prefix}.{sub}:layer", "layer", module, 1, (), layer=layer, modality="text", params=names)


def hidden_slices(entries, d):
    return tuple(Slice(p, dim, (d,), 0) for p, dim in entries)


def check_kinds(family, kinds, supported):
    kinds = set(kinds or supported)
    bad = kinds - set(supported)
    if bad:
        raise BenchError(f"model family {family} has no unit kind(s) {sorted(bad)}; it has {tuple(supported)}")
    return kinds


# ---------------------------------------------------------------------------------------------
# checkpoints (transformers key names)

def read_hf_state(path, what: str = "checkpoint") -> dict:
    """A transformers checkpoint: folder (model.safetensors, sharded *.safetensors + index, pytorch_model.bin)
    or a single .safetensors / .bin / .pt file; `bench.checkpoints.load_state_dict` (errors name the file)."""
    from bench.checkpoints import load_state_dict
    return load_state_dict(path, what)


def load_mapped(model, state: dict, rename, allowed_missing=(), what="checkpoint", log=print, arch=None,
                source=None) -> dict:
    """Rename keys (rename(key) -> new key or None to drop), check keys and shapes against the model
    (`bench.checkpoints.check_matches`), load, and report what was left at random init. Only keys starting
    with one of `allowed_missing` may be missing (e.g. a classifier the base model lacks); a tied copy (GPT-2's
    lm_head) is the tensor it is tied to, so the checkpoint's copy, if any, is dropped."""
    from bench.checkpoints import check_matches
    tied = set(getattr(model, "_bench_tied_keys", ()))
    mapped = {}
    for k, v in state.items():
        nk = rename(k)
        if nk is not None and nk not in tied:
            mapped[nk] = v
    missing = check_matches(model, mapped, arch or type(model).__name__, source if source is not None else what,
                            optional=tuple(allowed_missing))
    model.load_state_dict(mapped, strict=False)
    # the runner refuses a dense row from such a model unless the profile finetunes it densely first
    model._bench_left_at_init = sorted({k.rsplit(".", 1)[0] for k in missing})
    if missing:
        log(f"note: {what} has no {model._bench_left_at_init}: left at random init (a base-model checkpoint has "
            "no task head; the profile's dense: recipe trains it on the task before pruning)")
    return {"missing": missing}


# ---------------------------------------------------------------------------------------------
# tied embeddings / LM head (GPT-2): safetensors refuses tensors that share memory, and the framework saves
# `model.state_dict()` with safetensors, so the tied copy is left out of the state dict and re-tied on load.

def _tied_state_dict(self, *args, **kwargs):
    out = type(self)._bench_base.state_dict(self, *args, **kwargs)
    prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
    for k in self._bench_tied_keys:
        out.pop(prefix + k, None)
    return out


def _tied_load_state_dict(self, state_dict, strict=True, assign=False):
    res = type(self)._bench_base.load_state_dict(self, state_dict, strict=False, assign=assign)
    missing = [k for k in res.missing_keys if k not in self._bench_tied_keys]
    if strict and (missing or res.unexpected_keys):
        raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: missing {missing[:5]}, "
                           f"unexpected {res.unexpected_keys[:5]}")
    retie(self)
    res.missing_keys[:] = missing
    return res


def tie_outputs(model, tied: dict):
    """tied = {"lm_head.weight": "transformer.wte.weight"}: the first is always the second tensor."""
    model._bench_tied = dict(tied)
    model._bench_tied_keys = tuple(tied)
    swap_class(model, "Tied", {"state_dict": _tied_state_dict, "load_state_dict": _tied_load_state_dict})
    retie(model)


def retie(model):
    for dst, src in getattr(model, "_bench_tied", {}).items():
        mod_name, _, attr = dst.rpartition(".")
        mod = model.get_submodule(mod_name)
        setattr(mod, attr, model.get_parameter(src))
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape


EXAMPLE_SEQ_LEN = 128   # `bench flops/speed --model`: one 128-token sequence per sample (cards give their own)


class LanguageMasks:
    """Mixin for the language adapters: the mask API on top of the family's `mask_sites(model, ffn_at)`.

    attach_unit_masks(model, structure, kinds=("head_dim", "ffn"), ffn_at="pre_act") -> {group: ones tensor
        (requires_grad)}; "pre_act" is UPop's position (FFN mask before the activation).
    set_unit_masks(model, structure, masks, ffn_at=None): replace the masks of the named groups (others keep
        theirs). ffn_at None keeps the position of masks already attached, else "post_act" (VTrans's position,
        after the activation). Masks: (size,) or per token (batch, tokens, size).
    clear_unit_masks(model): remove every mask and hook.
    fold_unit_masks(model, structure, values) -> keep: multiply deterministic values (size,) into the weights,
        remove the masks and return keep = value != 0; `extract(model, adapter, structure, keep)` then gives
        the unmasked model that computes what the masked one did."""

    def example_inputs(self, batch_size: int, device) -> tuple:
        """(input_ids (B, 128),) of a constant valid token id, at most the model's position count."""
        c = self.config
        n = min(EXAMPLE_SEQ_LEN, int(c.get("max_position_embeddings") or c.get("n_positions") or EXAMPLE_SEQ_LEN))
        return (torch.full((batch_size, n), min(5, int(c["vocab_size"]) - 1), dtype=torch.long, device=device),)

    def attach_unit_masks(self, model, structure, kinds=("head_dim", "ffn"), ffn_at="pre_act"):
        masks = ones_masks(model, structure, kinds)
        self.set_unit_masks(model, structure, masks, ffn_at=ffn_at)
        return masks

    def set_unit_masks(self, model, structure, masks, ffn_at=None):
        current = model.__dict__.get("_ffn_mask_at")
        at = ffn_at or current or "post_act"
        if current and at != current and model.__dict__.get("_unit_mask_hooks"):
            kept = dict(model.__dict__.get("_unit_masks", {}))
            clear_masks(model)           # the FFN position changed: register every hook again
            masks = {**kept, **masks}
        model.__dict__["_ffn_mask_at"] = at
        set_masks(model, self.mask_sites(model, at), masks)

    def clear_unit_masks(self, model):
        clear_masks(model)

    def geometry(self, model):
        """The transformers config's shape (GPT-2's n_embd/n_head/n_layer are aliased to these names)."""
        from bench.api import Geometry
        cfg = model.config
        heads, width = int(cfg.num_attention_heads), int(cfg.hidden_size)
        return Geometry(width=width, heads=heads, head_dim=int(getattr(cfg, "head_dim", None) or width // heads),
                        layers=int(cfg.num_hidden_layers))

    def fold_unit_masks(self, model, structure, values):
        at = model.__dict__.get("_ffn_mask_at", "post_act")
        return fold_masks(model, self.mask_sites(model, at), values)


def materialise_buffers(model: nn.Module) -> None:
    """Fill the non-persistent buffers of a model built on `meta` (load_manifest builds there, and the
    safetensors file does not hold them): position ids, token-type ids and RoPE frequencies, on CPU."""
    for mod in model.modules():
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf is None or not buf.is_meta:
                continue
            if name == "position_ids":
                new = torch.arange(buf.shape[-1]).expand(buf.shape)
            elif name == "token_type_ids":
                new = torch.zeros(buf.shape, dtype=buf.dtype)
            elif name in ("inv_freq", "original_inv_freq"):
                init = getattr(mod, "rope_init_fn", None) or mod.compute_default_rope_parameters
                with torch.device("cpu"):
                    new = init(mod.config)[0].to(buf.dtype)
            else:
                continue                      # unknown: load_manifest names it
            mod._buffers[name] = new.to(buf.dtype)
