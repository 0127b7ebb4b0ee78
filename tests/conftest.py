import copy
import os

import pytest
import torch

from bench.registry import MODELS

# `bench run` in the tests runs its cells serially unless a test asks for workers (without --workers the micro
# profile on CPU takes one worker per core); child processes inherit this
os.environ.setdefault("BENCH_WORKERS", "1")


def build(arch, seed=0, **overrides):
    cls, cfg = MODELS.get(arch)
    adapter = cls(arch, {**cfg, **overrides})
    torch.manual_seed(seed)
    return adapter, adapter.build().eval()


def random_keep(structure, seed=0, frac=0.5):
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for grp in structure:
        k = torch.rand(grp.size, generator=g) > frac
        k[torch.randint(grp.size, (1,), generator=g)] = True  # at least one unit
        keep[grp.name] = k
    return keep


@pytest.fixture
def micro():
    return build("vit_micro")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Tests never touch the user's cache or results."""
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BENCH_OUTPUT", str(tmp_path / "out"))
    monkeypatch.setenv("BENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BENCH_CHECKPOINTS", str(tmp_path / "ckpt"))


__all__ = ["build", "random_keep", "copy"]


@pytest.fixture
def own_cards(tmp_path, monkeypatch):
    """A folder of the user's cards (BENCH_TABLES) and an output folder that must stay empty."""
    cards = tmp_path / "cards"
    cards.mkdir()
    monkeypatch.setenv("BENCH_TABLES", str(cards))
    monkeypatch.setenv("BENCH_OUTPUT", str(tmp_path / "out"))
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    return cards
