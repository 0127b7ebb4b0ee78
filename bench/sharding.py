"""`sharding: fsdp`: a training phase of `bench.training.train` on a fully-sharded twin of the model (torch FSDP2,
`torch.distributed.fsdp.fully_shard`), for models whose weights, gradients and AdamW states do not fit one GPU.

Why a twin: `fully_shard` turns a module into an FSDP module in place (its class becomes a generated subclass,
its parameters DTensor shards), but the suite's methods, extraction, evaluation and measurement work on a plain
module after the phase. So the phase trains a copy and the caller's model object stays what it was:

- build (no copy of the weights): `copy.deepcopy(model, memo)` with the memo mapping every parameter and buffer
  to an empty tensor on `meta` and every tensor outside the optimizer that takes gradients (a search method's
  masks) to itself, so the twin's modules multiply by the very mask tensors the method holds; then
  `fully_shard` on each of the adapter's `shard_units(model)` (the repeated Transformer blocks, deepest first),
  then on the root; then `to_empty(device)`, which allocates only this rank's shards (1 / world of each
  parameter along dim 0, torch.chunk's split); every rank then copies its rows from its own full copy of the
  caller's model (`push`: a local copy, no communication: every rank holds rank 0's weights, broadcast first)
  and the buffers whole. Two kinds of parameters stay replicated, whole on every rank as without sharding
  (`fully_shard(ignored_params=)`, listed in `replicated`): 0-dim ones (a learned temperature), which FSDP
  cannot shard, whose gradients the training loop averages as it does the masks'; and frozen ones (no gradient,
  no optimizer state: sharding them would save 4 bytes per parameter), so that a forward that updates them in
  place keeps its update: the momentum encoders of BLIP and CLIP retrieval, an EMA of the online encoders taken
  inside the forward (FSDP's gathered copy of a sharded parameter is freed after use, an in-place change to it
  lost). Those two families shard the root alone there, so the online weights are whole during the forward.
- train: FSDP's own gradient reduction, a reduce-scatter (mean over the ranks) after every micro-batch's
  backward, the gradients accumulated in sharded form. Not `set_requires_gradient_sync(False)` on the
  micro-batches before the last: FSDP2 then keeps every unit's unsharded gradient until the step, 4 bytes per
  parameter on every rank, which is what sharding must avoid; the price is one reduce-scatter per micro-batch
  instead of one per step. Clipping: `clip_grad_norm_` (below) sums the squares of the local shards, all-
  reduces them and adds the replicated tensors once: torch's formula on the full gradient.
- `pull` (every rank): each parameter gathered whole (`DTensor.full_tensor`, an all-gather) into the caller's
  parameter, the buffers copied back: after the phase, and before each `on_step` of a phase that has one (its
  callbacks read and modify the caller's model: SGMP's masks, per-epoch selection), followed by `push` so that
  what on_step changed reaches the twin. That costs one all-gather of the whole model per optimizer step.
- checkpoints hold what a non-sharded phase writes: the caller's `state_dict()` after a `pull`, and the
  optimizer's state in `torch.optim` form (integer parameter ids, full tensors) from `gather_optimizer_state`;
  on resume rank 0 reads the file, the weights reach the other ranks by `broadcast_module` and the optimizer's
  state tensor by tensor (`load_optimizer_state`), each rank keeping its rows. A checkpoint is therefore
  resumable with or without sharding.

Mixed precision: the recipe's bf16 autocast, as without sharding (the same numerics: norms, softmax and losses
stay fp32); not FSDP's MixedPrecisionPolicy, which would halve the all-gather traffic but run the whole forward
in bf16. fp16 (its GradScaler would check for inf on each rank's shards only) is refused.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from bench.errors import BenchError

SHARDINGS = ("none", "fsdp")


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def local_rows(full: torch.Tensor, world: int, rank: int) -> tuple[int, int]:
    """(offset, rows) of `rank`'s shard of `full` along dim 0 as FSDP2 splits it (torch.chunk: ceil(n / world)
    rows per rank, the last ranks with fewer or none)."""
    n = full.shape[0]
    per = -(-n // world)
    off = min(rank * per, n)
    return off, max(0, min(per, n - off))


class ShardedTwin:
    """The fully-sharded twin of `model` for one training phase (see the module's docstring). forward_only: a
    frozen copy that only runs forwards (a distillation teacher, VTrans's phase 1): every parameter but the 0-dim
    ones sharded, none takes gradients."""

    def __init__(self, model: nn.Module, adapter, device, outside: list, phase: str = "train",
                 forward_only: bool = False):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from bench import distributed as dist
        self.world, self.rank = dist.world_size(), dist.rank()
        self.phase = phase
        self.model = model
        names = {id(m): n for n, m in model.named_modules()}
        declared = getattr(adapter, "shard_units", None) if adapter is not None else None
        units = list(declared(model)) if declared is not None else []
        unit_names = []
        for u in units:
            n = names.get(id(u))
            if not n:
                fam = getattr(adapter, "family", "") or type(adapter).__name__
                raise BenchError(f"sharding fsdp ({phase}): model family {fam}'s shard_units gave a module that is "
                                 f"{'the root' if n == '' else 'not a submodule of the model'} "
                                 f"({type(u).__name__}); fix its shard_units")
            if n not in unit_names:
                unit_names.append(n)
        self.unit_names = unit_names
        # the twin, without copying any weight: parameters and buffers become empties on meta, the tensors
        # outside the optimizer (masks) are shared with the caller
        memo = {}
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"),
                                       requires_grad=p.requires_grad and not forward_only)
        for b in model.buffers():
            memo[id(b)] = torch.empty_like(b, device="meta")
        for t in outside:
            memo[id(t)] = t
        twin = copy.deepcopy(model, memo)
        ignored = {p for p in twin.parameters() if p.ndim == 0 or (not p.requires_grad and not forward_only)}
        mesh = init_device_mesh(torch.device(device).type, (self.world,))   # 1-D, over the default process group
        for n in sorted(unit_names, key=lambda s: s.count("."), reverse=True):   # inner units first
            fully_shard(twin.get_submodule(n), mesh=mesh, ignored_params=ignored)
        fully_shard(twin, mesh=mesh, ignored_params=ignored)
        twin.to_empty(device=device)
        twin.train(model.training)
        self.module = twin
        mine = dict(model.named_parameters())
        self.pairs = [(n, mine[n], p) for n, p in twin.named_parameters()]
        if len(self.pairs) != len(mine):
            raise BenchError(f"sharding fsdp ({phase}): the sharded copy has {len(self.pairs)} parameters, the model "
                             f"{len(mine)}")
        mine_b = dict(model.named_buffers())
        self.buffer_pairs = [(mine_b[n], b) for n, b in twin.named_buffers()]
        self.replicated = [p for _, _, p in self.pairs if not _is_dtensor(p)]
        self.push()

    # -------------------------------------------------------------------------------------- weights
    def push(self) -> None:
        """The caller's weights and buffers into the twin: each rank copies its own rows (no communication)."""
        with torch.no_grad():
            for _, mine, p in self.pairs:
                if _is_dtensor(p):
                    loc = p.to_local()
                    off, rows = local_rows(mine, self.world, self.rank)
                    if loc.shape[0] != rows:
                        raise BenchError(f"sharding fsdp ({self.phase}): rank {self.rank} holds {loc.shape[0]} rows "
                                         f"of a {tuple(mine.shape)} parameter, {rows} expected")
                    loc.copy_(mine.detach().narrow(0, off, rows))
                else:
                    p.copy_(mine.detach())
            for mine, b in self.buffer_pairs:
                b.copy_(mine)

    def pull(self) -> None:
        """The twin's weights (all-gathered whole) and this rank's buffers into the caller's model, on every rank."""
        with torch.no_grad():
            for _, mine, p in self.pairs:
                mine.copy_(p.full_tensor() if _is_dtensor(p) else p)
            for mine, b in self.buffer_pairs:
                mine.copy_(b)

    def twin_groups(self, groups: list) -> list:
        """The optimizer's parameter groups with the caller's parameters replaced by the twin's (tensors that are
        not the model's, a method's extra parameters, stay as they are: replicated)."""
        of = {id(mine): p for _, mine, p in self.pairs}
        return [{**g, "params": [of.get(id(q), q) for q in g["params"]]} for g in groups]   # extra tensors: as they are

    def caller_grads(self) -> list:
        """Names of the caller's parameters that got a gradient (something outside the twin used them)."""
        return [n for n, mine, _ in self.pairs if mine.grad is not None]

    # -------------------------------------------------------------------------------------- gradients
    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ (L2) over the full gradient of sharded and replicated tensors: the
        squares of the local shards are all-reduced, the replicated tensors' (equal on every rank) added once.
        Returns the total norm (a plain tensor, the same on every rank)."""
        from bench import distributed as dist
        grads = [p.grad for p in params if p.grad is not None]
        sharded = [g.to_local() for g in grads if _is_dtensor(g)]
        plain = [g for g in grads if not _is_dtensor(g)]
        dev = (sharded or plain)[0].device if (sharded or plain) else torch.device("cpu")
        sq = torch.zeros((), dtype=torch.float32, device=dev)
        for g in sharded:
            sq = sq + g.detach().float().pow(2).sum()
        sq = dist.all_reduce_sum(sq)
        for g in plain:
            sq = sq + g.detach().float().pow(2).sum().to(dev)
        total = sq.sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in sharded + plain:
            g.detach().mul_(coef.to(g.device, g.dtype))
        return total

    # -------------------------------------------------------------------------------------- optimizer state
    def gather_optimizer_state(self, opt) -> dict | None:
        """`opt.state_dict()` with every sharded state tensor all-gathered whole, on the CPU: the form a
        non-sharded optimizer saves. Collective (every rank); rank 0 gets it, the others None."""
        sd = opt.state_dict()
        out = {}
        for i in sorted(sd["state"]):
            entry = {}
            for k, v in sd["state"][i].items():
                if _is_dtensor(v):
                    v = v.full_tensor()
                entry[k] = v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
            out[i] = entry
        return {"state": out, "param_groups": sd["param_groups"]} if self.rank == 0 else None

    def load_optimizer_state(self, opt, sd: dict | None) -> None:
        """Load a `torch.optim` state dict (full tensors; rank 0's `sd`, None elsewhere) into the optimizer of the
        twin: the layout is broadcast, then each state tensor that has a sharded parameter's shape, and every rank
        keeps its rows. Collective (every rank)."""
        from bench import distributed as dist
        params = [p for g in opt.param_groups for p in g["params"]]
        layout = None
        if self.rank == 0:
            def kind(i, v):   # a state tensor shaped like its sharded parameter is sent as a tensor, the rest pickled
                if isinstance(v, torch.Tensor) and _is_dtensor(params[i]) and tuple(v.shape) == tuple(params[i].shape):
                    return ("tensor", tuple(v.shape), str(v.dtype).replace("torch.", ""))
                return ("value", v)
            layout = {"param_groups": sd["param_groups"],
                      "state": {i: {k: kind(i, v) for k, v in entry.items()} for i, entry in sd["state"].items()}}
        layout = dist.broadcast_object(layout)
        comm = dist._comm_device()
        state = {}
        for i in sorted(layout["state"]):
            p = params[i]
            entry = {}
            for k, (kind, *rest) in layout["state"][i].items():
                if kind == "value":
                    entry[k] = rest[0]
                    continue
                shape, dtype = rest[0], getattr(torch, rest[1])
                full = (sd["state"][i][k].to(comm, dtype) if self.rank == 0
                        else torch.empty(shape, dtype=dtype, device=comm))
                torch.distributed.broadcast(full, src=0)
                local = torch.zeros_like(p, dtype=dtype)
                off, rows = local_rows(full, self.world, self.rank)
                local.to_local().copy_(full.narrow(0, off, rows))
                entry[k] = local
            state[i] = entry
        opt.load_state_dict({"state": state, "param_groups": layout["param_groups"]})

    def close(self) -> None:
        self.module = None
        self.pairs = self.buffer_pairs = self.replicated = []


def check_sharding(sharding: str, precision: str, world: int, phase: str) -> str:
    """The sharding a phase runs with: `none` in one process (nothing to shard over); fp16 refused under fsdp."""
    if sharding not in SHARDINGS:
        raise BenchError(f"training recipe ({phase}): sharding must be one of {', '.join(SHARDINGS)}, not {sharding!r}")
    if sharding == "none" or world <= 1:
        return "none"
    if precision == "fp16":
        raise BenchError(f"training recipe ({phase}): sharding fsdp with precision fp16: the GradScaler would look "
                         f"for inf/NaN in each rank's gradient shard only; use precision: bf16 (or fp32)")
    return sharding

