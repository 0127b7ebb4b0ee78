"""The training sample stream of every task: one global order, and one random generator per micro-batch.

Why: under data parallelism (bench.training.train on N ranks) an optimizer step must see the same samples,
augmented the same way, as in one process with the same micro-batch, and each rank should load and augment
only its own share. With one generator for the order and the augmentation together, a rank can only get
micro-batch k right by making micro-batches 0..k-1 too (every rank would decode and augment everything).
Here the order is a permutation per epoch from Generator(seed), which draws nothing else, and micro-batch k's
augmentation draws come from its own Generator(batch_seed(seed, k)): any rank makes micro-batch k alone.

`shard=(rank, world)`: the micro-batches k with k % world == rank (the assignment of
bench.distributed.shard); the others are skipped without any work. Epochs drop the last incomplete batch,
as the official loaders do (drop_last=True).
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import torch


def batch_seed(seed: int, k: int) -> int:
    """The seed of micro-batch k of the stream seeded with `seed` (a hash: no two (seed, k) share a generator)."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(k)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def check_shard(shard) -> tuple[int, int]:
    rank, world = (0, 1) if shard is None else (int(shard[0]), int(shard[1]))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard {shard!r}: give (rank, world) with 0 <= rank < world")
    return rank, world


def micro_batches(n: int, batch_size: int, seed: int, shard=None) -> Iterator[tuple[torch.Tensor, int]]:
    """Endless (indices into range(n) (a LongTensor of batch_size), the micro-batch's seed) of this rank's
    micro-batches: epoch after epoch, a permutation of range(n) from Generator(seed), cut into n // batch_size
    micro-batches; micro-batch k (counted over epochs) has seed batch_seed(seed, k)."""
    rank, world = check_shard(shard)
    bs = min(int(batch_size), int(n))
    if bs < 1:
        raise ValueError("micro_batches: an empty training split")
    order = torch.Generator().manual_seed(int(seed))
    k = 0
    while True:
        perm = torch.randperm(n, generator=order)
        for i in range(0, n - bs + 1, bs):
            if k % world == rank:
                yield perm[i:i + bs], batch_seed(seed, k)
            k += 1


def seeded_batches(n: int, batch_size: int, seed: int, shard=None) -> Iterator[list[tuple[int, int]]]:
    """`micro_batches` as a DataLoader batch sampler: each micro-batch a list of (index, that sample's seed),
    for a data set indexed by (index, seed) whose random transforms draw from the sample's seed, so the
    images do not depend on which loader worker makes them, nor on how many there are."""
    for idx, bseed in micro_batches(n, batch_size, seed, shard):
        yield [(int(j), batch_seed(bseed, pos)) for pos, j in enumerate(idx.tolist())]


def generator(seed: int) -> torch.Generator:
    """A CPU torch.Generator seeded with `seed` (a micro-batch's augmentation draws)."""
    return torch.Generator().manual_seed(int(seed))
