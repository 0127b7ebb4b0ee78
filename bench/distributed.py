"""The process group of a data-parallel run: `torchrun --nproc_per_node N -m bench run ...`.

torchrun starts N copies of `bench run`; each reads RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT) from
the environment, and `init(device)` joins them into one torch.distributed group: NCCL for CUDA cells (each rank
on GPU LOCAL_RANK), gloo for CPU cells. Every rank runs the same cells in the same order; rank 0 alone takes the
cell locks, reuses records, measures, evaluates and writes (records, manifests, CSVs, plots, the dense cache,
logs and progress lines); the others follow its decisions (`broadcast_object`) and take part in every training.

With WORLD_SIZE unset or 1 every function here is a no-op (or returns its input), so the single-process path is
unchanged bit for bit.

What is all-reduced, and why (DDP would only all-reduce parameters):
- `average_grads(tensors)` after the backward passes of an optimizer step: the gradients of the optimizer's
  parameters AND of every tensor outside the optimizer that takes gradients (UPop's search masks,
  `ModelAdapter.attach_unit_masks`: their accumulated gradient is UPop's importance, so every rank must rank
  the same values), averaged over the ranks. A tensor with a gradient on some ranks only gets zeros on the
  others, as in one process (where it has a gradient when any micro-batch used it);
- `average_tensors(dict)`: statistics a method computes outside the training loop (GOHSP's head-similarity
  calibration), so every rank takes the same decision from bit-identical values;
- `check_identical(obj, what)`: before extraction the runner checks that the keep-masks are identical on
  every rank (a hash per rank, gathered); otherwise the cell fails with the groups that differ.

The L1 coefficient of UPop's masks (`w_sp_attn`, `w_sp_mlp`): the suite's value is the coefficient of the L1
term in the step's gradient, averaged over the ranks, whatever the world size (the term is added once per
optimizer step on every rank, and the average of equal terms is the term). The official BLIP/CLIP scripts
divide the command-line value by the world size (`config['w_sp_attn'] = args.w_sp_attn / args.world_size`,
compress_nlvr.py; their masks are parameters of the DDP model, so DDP averages the gradients and the effective
coefficient is the CLI value / 8 on the official 8 GPUs); the DeiT and Segmenter scripts do not divide. A card
that wants the official BLIP effective value writes the CLI value / 8 (upop_nlvr2's paper profile: 6.0e-4 and
2.5e-5); docs/specs/upop.md §3.1 shows the term does not change UPop's ranking (a constant gradient is removed by the z-score).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import pickle
from pathlib import Path
from typing import Iterable, Iterator

import torch

from bench.errors import BenchError, CellFailure

_STATE = {"initialised_here": False, "device": None}
BUCKET_MB = 64
TIMEOUT_ENV = "BENCH_DIST_TIMEOUT_MINUTES"   # how long a rank waits for the others (rank 0 may evaluate, measure)
DEFAULT_TIMEOUT_MIN = 120.0


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        raise BenchError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not a whole number (torchrun sets it)") from None


def _dist():
    import torch.distributed as d
    return d if d.is_available() and d.is_initialized() else None


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d is not None else 1


def rank() -> int:
    d = _dist()
    return d.get_rank() if d is not None else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def init(device: str = "cpu") -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
    backend nccl for a CUDA device (this rank on GPU LOCAL_RANK), gloo otherwise. Returns whether a group of
    more than one process is up. WORLD_SIZE unset or 1: nothing is done."""
    n = env_world_size()
    if n <= 1:
        return False
    import torch.distributed as d
    if d.is_initialized():
        return d.get_world_size() > 1
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise BenchError(f"WORLD_SIZE={n} but {', '.join(missing)} unset: start data-parallel runs with "
                         f"torchrun --nproc_per_node {n} -m bench run ... (it sets them)")
    dev = torch.device(device).type
    if dev == "cuda":
        if not torch.cuda.is_available():
            raise BenchError("--device cuda under torchrun, but torch sees no CUDA device; use --device cpu (gloo)")
        if local_rank() >= torch.cuda.device_count():
            raise BenchError(f"LOCAL_RANK {local_rank()} but only {torch.cuda.device_count()} GPU(s) visible: run "
                             f"torchrun with --nproc_per_node at most the number of GPUs of the node")
        torch.cuda.set_device(local_rank())
    backend = "nccl" if dev == "cuda" else "gloo"
    minutes = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_MIN)
    d.init_process_group(backend=backend, timeout=dt.timedelta(minutes=minutes))
    _STATE.update(initialised_here=True, device=dev)
    return d.get_world_size() > 1


def cleanup() -> None:
    """Leave the process group (if `init` made it)."""
    d = _dist()
    if d is not None and _STATE["initialised_here"]:
        d.destroy_process_group()
    _STATE.update(initialised_here=False, device=None)


def backend() -> str | None:
    d = _dist()
    return d.get_backend() if d is not None else None


def _comm_device() -> torch.device:
    """Where collective tensors live: the current GPU for NCCL, the CPU for gloo."""
    if backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        d.barrier()


def broadcast_object(obj=None, src: int = 0):
    """`obj` of rank `src` on every rank (pickled); the input itself in one process."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return obj
    box = [obj if d.get_rank() == src else None]
    d.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return [obj]
    out = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def _reduce(tensor: torch.Tensor, mean: bool) -> torch.Tensor:
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return tensor
    dev = _comm_device()
    t = tensor.detach().to(dev) if tensor.device != dev else tensor.detach().clone()
    d.all_reduce(t)
    if mean:
        t /= d.get_world_size()
    return t.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks (a new tensor on the input's device; the input itself in one process)."""
    return _reduce(tensor, mean=False)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over the ranks (a new tensor on the input's device; the input itself in one process)."""
    return _reduce(tensor, mean=True)


def _pad_to_max_width(tensor: torch.Tensor, pad_value) -> torch.Tensor:
    """Pad dim 1 to the widest of the ranks (token ids / masks padded to each rank's own longest text)."""
    width = int(all_reduce_max(torch.tensor([tensor.shape[1]], dtype=torch.int64)).item())
    if width == tensor.shape[1]:
        return tensor
    pad = tensor.new_full((tensor.shape[0], width - tensor.shape[1], *tensor.shape[2:]), pad_value)
    return torch.cat([tensor, pad], dim=1)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise max over the ranks (the input itself in one process)."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return tensor
    t = tensor.detach().to(_comm_device()).clone()
    d.all_reduce(t, op=d.ReduceOp.MAX)
    return t.to(tensor.device)


def gather_cat(tensor: torch.Tensor, pad_value=None) -> torch.Tensor:
    """The ranks' tensors concatenated along dim 0, rank 0's first, without gradient (BLIP's
    `concat_all_gather`); `pad_value`: first pad dim 1 to the widest rank. The input itself in one process.
    Every rank must pass the same number of rows (per_rank_batch makes the micro-batches equal)."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return tensor
    t = tensor.detach()
    if pad_value is not None:
        t = _pad_to_max_width(t, pad_value)
    dev = _comm_device()
    t = t.to(dev).contiguous()
    parts = [torch.empty_like(t) for _ in range(d.get_world_size())]
    d.all_gather(parts, t)
    return torch.cat(parts, dim=0).to(tensor.device)


def gather_cat_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """As gather_cat, but the gradient flows back to each rank's own rows (BLIP's `all_gather_with_grad`:
    the backward sums the ranks' gradients of a row on the rank that owns it)."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather
    dev = _comm_device()
    parts = all_gather(tensor.to(dev).contiguous())
    return torch.cat(parts, dim=0).to(tensor.device)


def agree(flag: bool) -> bool:
    """Rank 0's answer on every rank (e.g. "a checkpoint is due now": a clock differs between ranks)."""
    if world_size() == 1:
        return bool(flag)
    d = _dist()
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    d.broadcast(t, src=0)
    return bool(t.item())


def per_rank_values(value: float) -> list:
    """[value of rank 0, value of rank 1, ...] on every rank (one all-reduce of a W-vector; NaN stays NaN)."""
    n = world_size()
    if n == 1:
        return [float(value)]
    v = torch.zeros(n, dtype=torch.float64)
    v[rank()] = float(value)
    return all_reduce_sum(v).tolist()


def _buckets(tensors: list, limit_bytes: int) -> Iterator[list]:
    by_kind: dict = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for group in by_kind.values():
        cur, size = [], 0
        for t in group:
            cur.append(t)
            size += t.numel() * t.element_size()
            if size >= limit_bytes:
                yield cur
                cur, size = [], 0
        if cur:
            yield cur


def average_grads(tensors: Iterable[torch.Tensor], bucket_mb: float = BUCKET_MB) -> int:
    """Average the `.grad` of `tensors` over the ranks, in place (flattened buckets of about `bucket_mb` MB per
    dtype and device, one all-reduce each). A tensor whose gradient is None on every rank stays None; one with a
    gradient on some ranks gets zeros on the others first. The tensors must be listed in the same order on every
    rank. Returns how many gradients were averaged (0 in one process)."""
    n = world_size()
    if n == 1:
        return 0
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    d = _dist()
    tensors = list(tensors)
    present = torch.tensor([t.grad is not None for t in tensors], dtype=torch.int32, device=_comm_device())
    d.all_reduce(present)
    grads = []
    for t, c in zip(tensors, present.tolist()):
        if not c:
            continue
        if t.grad is None:
            t.grad = torch.zeros_like(t)
        grads.append(t.grad)
    dev = _comm_device()
    for bucket in _buckets(grads, int(bucket_mb * 2 ** 20)):
        flat = _flatten_dense_tensors([g.detach() for g in bucket])
        moved = flat.device != dev
        if moved:
            flat = flat.to(dev)
        d.all_reduce(flat)
        flat /= n
        if moved:
            flat = flat.to(bucket[0].device)
        for g, v in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(v)
    return len(grads)


def average_tensors(tensors: dict) -> dict:
    """{name: tensor averaged over the ranks} (statistics a method computes on its own: every rank then decides
    from bit-identical values). Names must be the same on every rank; the input itself in one process."""
    if world_size() == 1:
        return tensors
    return {k: all_reduce_mean(v) for k, v in tensors.items()}


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (so that all ranks stop together, or none)."""
    if world_size() == 1:
        return bool(torch.isfinite(loss))
    vals = per_rank_values(float(loss.detach()))
    return all(v == v and abs(v) != float("inf") for v in vals)


def shard(items: Iterable, n: int | None = None, r: int | None = None) -> Iterator:
    """Items r, r + n, r + 2n, ... of a stream (every rank draws the same global stream, seeded the same, and
    keeps its share: micro-batch i goes to rank i mod n). The stream itself in one process."""
    n = world_size() if n is None else n
    r = rank() if r is None else r
    it = iter(items)
    if n == 1:
        yield from it
        return
    while True:
        chunk = []
        for _ in range(n):
            try:
                chunk.append(next(it))
            except StopIteration:
                return
        yield chunk[r]


def rank_batches(task, batch_size: int, seed: int, **kw) -> Iterator:
    """This rank's share of the task's training stream (micro-batch i for i mod world == rank). A task whose
    train_batches takes `shard` (tasks.common.batching) makes only this rank's micro-batches; for any other,
    every rank draws the whole stream and keeps its share (`shard`). One process: the stream itself."""
    import inspect
    n = world_size()
    if n > 1 and "shard" in inspect.signature(task.train_batches).parameters:
        return iter(task.train_batches(batch_size, seed, shard=(rank(), n), **kw))
    return shard(task.train_batches(batch_size, seed, **kw))


def per_rank_batch(batch_size: int, what: str) -> int:
    """batch_size / world size (a method's own loop that draws batches itself, e.g. VTrans); BenchError when the
    world size does not divide it."""
    n = world_size()
    if batch_size % n:
        raise BenchError(f"{what} {batch_size} is not divisible by the {n} data-parallel processes: each rank takes "
                         f"an equal share of every batch; use a batch size that is a multiple of {n}, or run on a "
                         f"number of processes that divides {batch_size}")
    return batch_size // n


def broadcast_module(model: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers into every rank's `model` (same architecture on every rank)."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return
    dev = _comm_device()
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            buf = t.data.to(dev) if t.device != dev else t.data
            d.broadcast(buf, src=src)
            if buf is not t.data:
                t.data.copy_(buf)


def sync_rng(src: int = 0) -> None:
    """Give every rank rank `src`'s global torch RNG state (CPU, and the current GPU's): after a data-parallel
    training phase, in which each rank drew its own dropout, the code outside it draws the same numbers
    everywhere."""
    if world_size() == 1:
        return
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    state = broadcast_object((torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None), src=src)
    torch.set_rng_state(state[0])
    if cuda and state[1] is not None:
        torch.cuda.set_rng_state(state[1])


def fingerprint_of(obj) -> str:
    """A content hash of a dict/list of tensors and plain values (keys sorted, tensors by dtype, shape, bytes)."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=str):
                h.update(repr(k).encode())
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            buf = io.BytesIO()
            pickle.dump(x, buf)
            h.update(buf.getvalue())
    feed(obj)
    return h.hexdigest()[:16]


def check_identical(obj, what: str = "keep-masks") -> dict:
    """Check that `obj` (the keep-masks: {group: bool tensor}) is identical on every rank: each rank hashes it
    (per entry for a dict), the hashes are gathered, and a CellFailure names the entries and ranks that differ.
    Returns {"world_size", "hash", "checked"} (checked False in one process)."""
    n = world_size()
    digest = fingerprint_of(obj)
    if n == 1:
        return {"world_size": 1, "hash": digest, "checked": False}
    per_entry = {str(k): fingerprint_of(v) for k, v in obj.items()} if isinstance(obj, dict) else {"": digest}
    gathered = all_gather_object({"hash": digest, "entries": per_entry})
    if all(g["hash"] == gathered[0]["hash"] for g in gathered):
        return {"world_size": n, "hash": digest, "checked": True}
    diffs = []
    names = sorted({k for g in gathered for k in g["entries"]})
    for k in names:
        ranks = [r for r, g in enumerate(gathered) if g["entries"].get(k) != gathered[0]["entries"].get(k)]
        if ranks:
            diffs.append(f"{k or what} (ranks {', '.join(map(str, ranks))} differ from rank 0)")
    shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
    raise CellFailure(f"{what} differ across the {n} data-parallel ranks: {len(diffs)} group(s): {shown}. Every "
                      f"state that drives a pruning decision must be all-reduced (bench.distributed.average_grads / "
                      f"average_tensors)")


def check_cells(cells: list) -> None:
    """Before a data-parallel run starts: every training recipe of every cell (dense, finetune, a method's
    batch_size) splits over the world size; one BenchError line naming the cell, the key and the fix otherwise."""
    n = world_size()
    if n == 1:
        return
    for cell in cells:
        blocks = [("dense", cell.get("dense_training")), ("finetune", cell.get("finetune")),
                  (cell["method"], cell.get("method_settings"))]
        for name, block in blocks:
            if not isinstance(block, dict) or not block.get("batch_size"):
                continue
            bs, micro = int(block["batch_size"]), block.get("micro_batch_size")
            m = int(micro) if micro else bs // n
            if m < 1 or bs % (n * m):
                fix = (f"set {name}.micro_batch_size to a divisor of {bs // n} (= batch_size / {n})"
                       if bs % n == 0 else f"run on a number of processes that divides {bs}")
                raise BenchError(f"{cell['cell_id']}: {name}.batch_size {bs} is not divisible by world size {n} x "
                                 f"micro_batch_size {micro or 'batch_size / world size'}: each of the {n} ranks takes "
                                 f"batch_size / {n} samples per optimizer step; {fix}")


def run_command(cmd_run, args):
    """`bench run` under torchrun (WORLD_SIZE > 1): join the group (nccl on CUDA, gloo on CPU), run the same
    cells on every rank with the output of ranks > 0 silenced (their errors still reach stderr), leave the group.
    Without torchrun: `cmd_run(args)` as it is."""
    if env_world_size() <= 1:
        return cmd_run(args)
    if (args.workers or 1) > 1 or args.launcher:
        raise BenchError(f"{'--workers' if (args.workers or 1) > 1 else '--launcher'} with torchrun: a data-parallel "
                         f"run computes its cells one after the other on all {env_world_size()} processes; drop the "
                         f"flag (or run without torchrun to spread cells over workers or jobs)")
    import contextlib
    import sys

    from bench.runner import expand_cells, load_checked_card, resolve_device
    device = resolve_device(args.device)
    init(device)
    try:
        check_cells(expand_cells(load_checked_card(args.table), args.profile, args.methods, args.ratios, args.seeds,
                                 device))
        if is_main():
            return cmd_run(args)
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            return cmd_run(args)
    finally:
        sys.stdout.flush()
        cleanup()


# --------------------------------------------------------------------------------------------------------
# one cell on G processes: what a `--launcher local|slurm --gpus-per-cell G` job runs

def launch_cell(cell: dict, paths: dict, nproc_per_node: int, train_options: dict | None = None) -> tuple[dict, bool]:
    """Run one cell data-parallel on `nproc_per_node` processes of this node with torchrun (torch.distributed.run,
    `--standalone`: a rendezvous on this node), one per GPU of the job (gloo processes on CPU). Every rank runs
    `python -m bench.distributed --cell <cells/<hash>/launch.json>`; rank 0 writes the record, which is returned
    with whether it was reused. A cell across several nodes is not launched this way: start torchrun yourself."""
    import subprocess
    import sys

    from bench.errors import CellFailure
    from bench.records import cell_dir, read_record, record_path
    from bench.structure import write_json_atomic
    output = Path(paths["output"])
    folder = cell_dir(output, cell["table"], cell["hash"])
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "launch.json"
    write_json_atomic(spec, {"cell": cell, "paths": {k: str(v) for k, v in paths.items()},
                             "train_options": train_options or {}})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc_per_node)}",
           "-m", "bench.distributed", "--cell", str(spec)]
    done = subprocess.run(cmd)
    rec = read_record(record_path(output, cell["table"], cell["hash"]))
    if rec is None:
        raise CellFailure(f"{cell['cell_id']}: torchrun on {nproc_per_node} processes ended (exit {done.returncode}) "
                          f"without a record; its log is above")
    return rec, False   # the job checked for a finished record before launching


def _cell_main(argv=None) -> int:
    """A rank of `launch_cell`: join the group torchrun made, run the cell with the run's training options
    (the cell lock and record reuse as in `bench run`; rank 0 writes), leave the group."""
    import argparse
    import json

    from bench.config import Paths
    from bench.locks import run_cell_once
    from bench.runner import Session
    p = argparse.ArgumentParser(prog="python -m bench.distributed", description=_cell_main.__doc__)
    p.add_argument("--cell", required=True, help="the launch.json launch_cell wrote")
    job = json.loads(Path(p.parse_args(argv).cell).read_text())
    cell = job["cell"]
    init(cell.get("device") or "cpu")
    try:
        session = Session(Paths(**{k: Path(v) for k, v in job["paths"].items()}),
                          log=print if is_main() else (lambda *a, **k: None), **job["train_options"])
        rec, reused = run_cell_once(cell, session)
        if is_main():
            print(f"{cell['cell_id']}: {rec['status']}" + (" (reused)" if reused else "")
                  + f" on {world_size()} processes", flush=True)
    finally:
        cleanup()
    return 0


if __name__ == "__main__":   # the module torchrun starts (the functions above run from the imported copy)
    import bench.distributed as _self
    raise SystemExit(_self._cell_main())
