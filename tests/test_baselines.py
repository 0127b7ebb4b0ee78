"""The baseline floors (issue 16): `random` (random units at SOMP's per-kind budget, seeded by the cell seed) and
`taylor` (first-order Taylor importance |sum w * dL/dw| per unit, Molchanov et al. 2019, one shot)."""
import pytest
import torch
import torch.nn.functional as F

from bench.api import CellContext, RatioSpec
from bench.registry import METHODS
from methods.magnitude import select_units
from methods.taylor import taylor_scores, unit_contributions
from tests.conftest import build


class ToyImages:
    """vit_micro inputs: random 32x32 images, 10 classes (no data on disk)."""

    name = "toy"
    metrics = {"top1": True}

    def train_batches(self, batch_size, seed, recipe=None):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield torch.randn(batch_size, 3, 32, 32, generator=g), torch.randint(0, 10, (batch_size,), generator=g)

    def loss(self, model, batch, device, recipe=None):
        x, y = batch
        return F.cross_entropy(model(x.to(device)), y.to(device))

    def steps_per_epoch(self, batch_size):
        return 4


def _ctx(method, model, adapter, p=0.5, seed=0, options=None, settings=None):
    return CellContext(model=model, adapter=adapter, structure=adapter.structure(model), task=ToyImages(),
                       ratio=RatioSpec("2x", p), options=options or {"unit_kinds": ["head_dim", "ffn"]},
                       settings={"method": settings, "finetune": None}, device=torch.device("cpu"), seed=seed,
                       train=None, log=lambda m: None)


def _removed_by_kind(st, keep):
    out = {}
    for g in st:
        out[g.kind] = out.get(g.kind, 0) + int((~keep[g.name]).sum()) * g.params_per_unit
    return out


def test_random_units_use_somps_per_kind_budget_and_the_cell_seed():
    adapter, model = build("vit_micro")
    somp = METHODS.get("somp")()
    rnd = METHODS.get("random")()
    ctx = _ctx("somp", model, adapter)
    res = somp.prune(ctx)
    k_somp = res.keep
    st = res.structure
    r0 = rnd.prune(_ctx("random", model, adapter, seed=0)).keep
    r0_again = rnd.prune(_ctx("random", model, adapter, seed=0)).keep
    r1 = rnd.prune(_ctx("random", model, adapter, seed=1)).keep
    assert _removed_by_kind(st, r0) == _removed_by_kind(st, k_somp)      # the same params per kind as SOMP
    assert all(torch.equal(r0[n], r0_again[n]) for n in r0)              # a seed repeats
    assert any(not torch.equal(r0[n], r1[n]) for n in r0)                # seeds differ
    assert any(not torch.equal(r0[n], k_somp[n]) for n in r0)            # not the magnitude choice
    assert all(int(k.sum()) >= 1 for k in r0.values())


def test_taylor_importance_is_abs_sum_of_w_times_grad_per_unit():
    adapter, model = build("vit_micro")
    st = adapter.structure(model, ["head_dim", "ffn"])
    task = ToyImages()
    scores = taylor_scores(model, st, task, "cpu", batches=2, batch_size=8, seed=3)
    # brute force: the gradient of the two batches' losses, then per unit the sum of w * g over its weights
    it = task.train_batches(8, 3)
    model.zero_grad()
    for _ in range(2):
        task.loss(model, next(it), "cpu").backward()
    g = st.groups[0] if hasattr(st, "groups") else list(st)[0]
    assert g.kind == "head_dim"
    blk = model.blocks[0].attn
    H, dh = blk.num_heads, blk.head_dim
    w, gw = blk.qkv.weight, blk.qkv.weight.grad
    b, gb = blk.qkv.bias, blk.qkv.bias.grad
    pw, gpw = blk.proj.weight, blk.proj.weight.grad
    manual = torch.zeros(dh, dtype=torch.float64)
    for d in range(dh):
        rows = [s * H * dh + h * dh + d for s in range(3) for h in range(H)]
        cols = [h * dh + d for h in range(H)]
        manual[d] = ((w[rows] * gw[rows]).sum() + (b[rows] * gb[rows]).sum()
                     + (pw[:, cols] * gpw[:, cols]).sum()).double()
    assert torch.allclose(scores[g.name], manual.abs(), rtol=1e-5, atol=1e-9)
    contrib = unit_contributions(model, st)
    assert torch.allclose(contrib[g.name], manual, rtol=1e-5, atol=1e-9)
    model.zero_grad(set_to_none=True)
    # calibration leaves the weights and the mode alone
    assert not any(p.grad is not None for p in model.parameters())


def test_taylor_method_prunes_at_somps_budget_and_not_by_magnitude():
    adapter, model = build("vit_micro")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = _ctx("taylor", model, adapter, settings={"calibration_batches": 2, "batch_size": 8})
    res = METHODS.get("taylor")().prune(ctx)
    keep = res.keep
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())     # one shot: no weight update
    st = res.structure
    k_somp = METHODS.get("somp")().prune(_ctx("somp", model, adapter)).keep
    assert _removed_by_kind(st, keep) == _removed_by_kind(st, k_somp)
    assert any(not torch.equal(keep[n], k_somp[n]) for n in keep)
    assert res.info["options"]["criterion"] == "abs_sum"


def test_taylor_squared_criterion_is_the_mean_of_per_batch_squares():
    adapter, model = build("vit_micro")
    st = adapter.structure(model, ["ffn"])
    task = ToyImages()
    sq = taylor_scores(model, st, task, "cpu", batches=2, batch_size=4, seed=5, criterion="squared")
    it = task.train_batches(4, 5)
    per = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        task.loss(model, next(it), "cpu").backward()
        per.append(unit_contributions(model, st))
    for n in sq:
        assert torch.allclose(sq[n], (per[0][n] ** 2 + per[1][n] ** 2) / 2)
    keep = select_units(st, sq, 0.3)
    assert all(int(k.sum()) >= 1 for k in keep.values())


@pytest.mark.parametrize("name", ["random", "taylor"])
def test_baselines_finetune_with_the_card_block(name):
    M = METHODS.get(name)
    assert M.finetune and M.impl == "baseline"


def test_tiny_table_runs_the_floors_with_paper_selection_and_labels_the_rows(tmp_path):
    """End to end on a tiny upop_deit copy: random and taylor cells run, the finetune keeps its best val epoch
    (selection: paper), and the table and CSV label those rows and show each row's training compute."""
    import csv
    import io

    import yaml

    from tests.tiny_cards import bench, records, tiny_env
    env = tiny_env(tmp_path, methods=("dense", "taylor", "random"), ratios=slice(0, 1))
    path = tmp_path / "cards" / "tiny_deit.yaml"
    card = yaml.safe_load(path.read_text())
    card["profiles"]["micro"]["finetune"].update({"selection": "paper"})
    card["profiles"]["micro"]["taylor"] = {"calibration_batches": 2}
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    r = bench(env, "run", "--table", "tiny_deit", "--quiet", timeout=900)
    assert r.returncode in (0, 1), r.stdout[-3000:] + r.stderr[-3000:]
    recs = list(records(tmp_path / "out" / "tiny_deit").values())
    by = {x["method"]: x for x in recs}
    assert set(by) == {"dense", "taylor", "random"}
    for m in ("taylor", "random"):
        assert by[m]["status"] != "error", by[m]["reason"]
        sel = by[m]["selection"]
        assert sel["label"] == "(best-epoch on val)" and sel["epochs_evaluated"] == 2
        best = max(h["top1"] for h in sel["history"])
        assert sel["best_score"] == best and by[m]["metrics"]["top1"] == pytest.approx(best)
    assert by["dense"]["selection"] is None
    [lb] = sorted((tmp_path / "out").rglob("tiny_deit-micro-*.csv"))      # the leaderboard CSV of the run
    rows = [x for x in csv.DictReader(io.StringIO("\n".join(line for line in lb.read_text().splitlines()
                                                           if not line.startswith("#"))))]
    lab = {(x["method"], x["selection"], x["train_epochs"]) for x in rows if x["metric"] == "top1"}
    assert ("taylor", "(best-epoch on val)", "2.0") in lab or ("taylor", "(best-epoch on val)", "2") in lab
    md = bench(env, "report", "--table", "tiny_deit", "--format", "md").stdout
    assert "random (best-epoch on val)" in md
