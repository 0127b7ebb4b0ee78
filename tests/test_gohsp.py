"""GOHSP: Markov-chain head ranking, budgets (p of the total params), projection, ADMM residual,
masked vs extracted model."""
import copy
import functools

import pytest
import torch

from bench.api import CellContext, RatioSpec
from bench.options import parse_block
from bench.recipe import TrainRecipe
from bench.registry import METHODS
from bench.structure import extract, kept_param_count, mask_weights
from bench.training import train
from methods.gohsp import (GOHSPOptions, GOHSPSettings, eigen_stationary, gohsp_budgets, gohsp_plan, head_similarity,
                           project, select_at_budgets, stationary_distribution, transition_matrix)
from methods.magnitude import unit_scores
from models.vit import VitAdapter
from tests.conftest import build
from tests.test_methods import TinyTask


def test_stationary_distribution_symmetric_is_degree():
    w = torch.tensor([[0, 1, 2, 0.5], [1, 0, 1, 1], [2, 1, 0, 3], [0.5, 1, 3, 0]], dtype=torch.float64)
    P = transition_matrix(w)
    pi, _ = stationary_distribution(P)
    deg = w.sum(1)
    assert torch.allclose(pi, deg / deg.sum(), atol=1e-10)
    assert torch.allclose(pi, eigen_stationary(P), atol=1e-10)


@pytest.mark.parametrize("damping", [0.0, 0.15])
def test_stationary_distribution_asymmetric_matches_eigenvector(damping):
    w = torch.tensor([[0, 5, 1, 0.1], [0.2, 0, 3, 1], [4, 0.3, 0, 2], [1, 1, 0.5, 0]], dtype=torch.float64)
    P = transition_matrix(w, damping)
    assert torch.allclose(P.sum(1), torch.ones(4, dtype=torch.float64))
    pi, iters = stationary_distribution(P)
    assert torch.allclose(pi @ P, pi, atol=1e-10)
    assert torch.allclose(pi, eigen_stationary(P), atol=1e-9)
    deg = w.sum(1) / w.sum()
    assert not torch.allclose(pi, deg, atol=1e-3)          # asymmetric: not the degree


def test_similarity_graph_properties():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 4, 10, generator=g, dtype=torch.float64)
    f[:, 1] = -2 * f[:, 0]                                   # head 1 = scaled, flipped head 0
    for kind in ("abs_cosine", "correlation", "rbf", "cosine_relu"):
        s = head_similarity(f, kind)
        assert s.shape == (4, 4) and (s >= 0).all() and torch.allclose(s, s.T)
    assert head_similarity(f, "abs_cosine")[0, 1] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def micro_model():
    return build("vit_micro")


@pytest.mark.parametrize("p", [0.4, 0.6, 0.8])
@pytest.mark.parametrize("opts", [{}, {"attn_split": "heads_only"}, {"unit_kinds": ["head", "ffn"]},
                                  {"head_budget": "global"}, {"ffn_budget": "per_layer"}])
def test_budget_hits_total_sparsity_within_one_unit(micro_model, p, opts):
    adapter, model = micro_model
    o = GOHSPOptions(**opts)
    st = adapter.structure(model, o.unit_kinds)
    total = sum(x.numel() for x in model.parameters())
    plan = gohsp_plan(st, p, total, o.attn_split, o.ffn_budget)
    ffn_ppu = next(g.params_per_unit for g in st if g.kind == "ffn")
    assert abs(plan["planned"] - p * total) <= ffn_ppu / 2 + 1e-6
    keep = select_at_budgets(st, unit_scores(model, st), p, total, head_budget=o.head_budget,   # SOMP at GOHSP's
                             attn_split=o.attn_split, ffn_budget=o.ffn_budget)                  # budgets
    removed = kept_param_count(model, st, keep)["removed"]
    assert removed == pytest.approx(plan["planned"], abs=1e-6)
    assert abs(removed - p * total) <= ffn_ppu
    budgets = gohsp_budgets(st, p, total, o.attn_split, o.ffn_budget)
    for kind, n in budgets.items():
        assert sum(int((~keep[g.name]).sum()) for g in st if g.kind == kind) == n
    assert all(int(k.sum()) >= 1 for k in keep.values())


def test_projection_keeps_exactly_the_budgeted_heads_and_columns(micro_model):
    adapter, model = micro_model
    st = adapter.structure(model, ["head", "head_dim", "ffn"])
    total = sum(x.numel() for x in model.parameters())
    plan = gohsp_plan(st, 0.6, total)
    head_keep = {g.name: torch.arange(g.size) % 2 == 0 for g in st if g.kind == "head"}
    plan["per_group"].update({g.name: g.size // 2 for g in st if g.kind == "head"})
    params = dict(model.named_parameters())
    from bench.structure import param_masks
    names = list(param_masks(model, st, st.full_keep()))
    keep, Z = project(st, {n: params[n].detach() for n in names}, head_keep, plan)
    for g in st:
        if g.kind == "head":
            assert torch.equal(keep[g.name], head_keep[g.name])
        elif g.kind == "head_dim":
            assert int((~keep[g.name]).sum()) == plan["per_group"][g.name]
    assert sum(int((~keep[g.name]).sum()) for g in st if g.kind == "ffn") == plan["per_kind"]["ffn"]
    # Z is W on the kept support, zero elsewhere; pruned FFN neurons have the smallest group norms
    masks = param_masks(model, st, keep)
    for n in names:
        assert torch.equal(Z[n], params[n].detach() * masks[n])
    sc = unit_scores(model, st.of_kind("ffn"))
    cut = max(float(sc[g.name][~keep[g.name]].max()) for g in st if g.kind == "ffn" and (~keep[g.name]).any())
    kept_min = min(float(sc[g.name][keep[g.name]].min()) for g in st if g.kind == "ffn")
    assert cut <= kept_min + 1e-12


def _run_gohsp(p, opts=None, epochs=3.0):
    adapter, model = build("vit_micro")
    task = TinyTask()
    s = {"admm_epochs": epochs, "batch_size": 32, "lr": 1e-3, "rho0": 1.0, "rho_growth": 1.5,
         "calib_batches": 2, "calib_batch_size": 32}
    ctx = CellContext(model=model, adapter=adapter, structure=adapter.structure(model), task=task,
                      ratio=RatioSpec("x", p), options=parse_block(GOHSPOptions, opts, "method_options.gohsp"),
                      settings={"finetune": TrainRecipe(epochs=1, lr=1e-3, batch_size=32),
                                "method": parse_block(GOHSPSettings, s, "gohsp")},
                      device=torch.device("cpu"), seed=0, train=functools.partial(train, task=task, device="cpu", seed=0),
                      log=lambda m: None)
    res = METHODS.get("gohsp")().prune(ctx)
    return adapter, model, res, res.keep


@pytest.fixture(scope="module")
def gohsp_run():
    return _run_gohsp(0.4)


def test_admm_residual_shrinks_and_sparsity_is_met(gohsp_run):
    adapter, model, res, keep = gohsp_run
    hist = res.info["admm"]["history"]
    assert len(hist) == 4                                         # initial + one per epoch
    resid = [h["primal_residual"] for h in hist]
    assert resid[-1] < 0.8 * resid[0] and all(b <= a + 1e-9 for a, b in zip(resid, resid[1:]))
    assert [h["rho"] for h in hist][1:] == pytest.approx([1.0, 1.0, 1.0])  # capped at rho_max = 1
    total = sum(x.numel() for x in model.parameters())
    removed = kept_param_count(model, res.structure, keep)["removed"]
    ffn_ppu = next(g.params_per_unit for g in res.structure if g.kind == "ffn")
    assert abs(removed - 0.4 * total) <= ffn_ppu
    for g in res.info["graph"].values():
        assert g["max_gap_vs_eigenvector"] < 1e-8 and sum(g["pi"]) == pytest.approx(1.0, abs=1e-5)
    assert METHODS.get("gohsp").impl == "reimpl"


def test_masked_and_extracted_model_agree(gohsp_run):
    adapter, model, res, keep = gohsp_run
    masked = copy.deepcopy(model)
    mask_weights(masked, res.structure, keep)
    small = extract(copy.deepcopy(model), adapter, res.structure, keep)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(masked.eval()(x), small.eval()(x), atol=1e-5)
    assert sum(q.numel() for q in small.parameters()) == kept_param_count(model, res.structure, keep)["total"]


def test_global_budget_and_redundancy_direction():
    _, model, res, keep = _run_gohsp(0.6, {"head_budget": "global", "ranking": "redundancy", "damping": 0.15},
                                     epochs=1.0)
    plan = res.info["budget"]["per_kind"]
    assert sum(int((~keep[g.name]).sum()) for g in res.structure if g.kind == "head") == plan["head"]
    # redundancy: the removed heads are the ones with the largest pi within their block (per block here
    # only checked where a block lost heads and kept some)
    for g in res.structure:
        if g.kind == "head" and (~keep[g.name]).any() and keep[g.name].any():
            pi = torch.tensor(res.info["graph"][g.name]["pi"])
            assert pi[~keep[g.name]].min() >= pi[keep[g.name]].max() - 1e-6


def test_vit_small_cifar_config_plan():
    cfg = dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True,
               num_classes=10)
    adapter = VitAdapter("vit_small_patch4_32", cfg)
    with torch.device("meta"):
        model = adapter.build()
    st = adapter.structure(model, ["head", "head_dim", "ffn"])
    total = sum(x.numel() for x in model.parameters())
    for p in (0.4, 0.6, 0.8):
        plan = gohsp_plan(st, p, total)
        assert abs(plan["planned"] - p * total) <= 769 / 2 + 1e-6
