"""`bench plan`: exact step counts, the MAC convention, the memory estimate and the CLI (all on the meta device)."""
import math

import pytest
import torch

from bench import plan
from bench.cli import main
from bench.measure import count_macs
from bench.registry import MODELS, TASKS
from bench.runner import expand_cells, load_checked_card

SETTINGS = {"gpus": 1, "gpu_memory": 80.0, "utilization": 0.4, "gpu_tflops": 312.0}


def test_optimizer_steps_by_hand():
    assert plan.optimizer_steps(3, 1000, 64) == 45          # 1000 // 64 = 15 steps per epoch
    assert plan.optimizer_steps(2.5, 1000, 64) == 38        # round(37.5)
    assert plan.optimizer_steps(0, 1000, 64) == 0
    assert plan.optimizer_steps(1, 10, 64) == 1             # fewer samples than a batch: one step per epoch
    assert plan.optimizer_steps(0.01, 1000, 64) == 1        # any budget trains at least one step


def test_table_steps_exact():
    """UPop on DeiT-S (paper): 1,281,167 // 4096 = 312 steps per epoch; 60 search + 300 finetune epochs."""
    p = plan.plan_table("upop_deit", "paper", gpus=8, methods="upop", ratios="2.00x")
    (cell,) = p["cells"]
    search, finetune = cell["phases"]
    assert (search["name"], search["steps_per_epoch"], search["steps"]) == ("search", 312, 60 * 312)
    assert (finetune["name"], finetune["steps"], finetune["batch"]) == ("finetune", 300 * 312, 4096)
    assert cell["steps"] == p["totals"]["steps"] == 18_720 + 93_600
    # the pruned finetune costs less than the dense search per sample, more than (1 - p) x dense (a lower bound)
    assert 0.5 * search["fwd_macs"] < finetune["fwd_macs"] < search["fwd_macs"]
    # with the training-set size given: 1000 // 4096 -> 1 step per epoch
    q = plan.plan_table("upop_deit", "paper", methods="upop", ratios="2.00x", train_size=1000)
    assert [ph["steps"] for ph in q["cells"][0]["phases"]] == [60, 300]


def test_mac_convention_against_count_macs():
    """Training MACs per step = 3 x the suite counter's forward MACs of one sample x the batch, on a micro ViT."""
    cfg = next(c for c in expand_cells(load_checked_card("upop_deit"), "micro", "somp", None) if c["method"] == "somp")
    task = TASKS.get(cfg["task"])(cfg["data"], None, "micro", "/nonexistent")   # only asked for its dummy inputs
    costs = plan.ModelCosts().get(cfg["model"], cfg["model_config"], task, cfg["task"])
    cls, _ = MODELS.get(cfg["model"])
    model = cls(cfg["model"], cfg["model_config"]).build().eval()
    (args, kwargs), = task.flops_forwards(cfg["model_config"], torch.device("cpu")).values()
    fwd = count_macs(model, args, kwargs)["macs"]
    assert args[0].shape[0] == 1 and costs["fwd_macs"] == fwd > 0
    ph = plan._phase_cost("finetune", 2.0, 16, {}, costs, 100, SETTINGS)     # 100 // 16 = 6 steps/epoch, 12 steps
    assert ph["steps"] == 12
    assert ph["macs_per_step"] == plan.train_macs_per_step(fwd, 16) == 3 * fwd * 16
    assert ph["macs"] == 3 * fwd * 16 * 12
    assert ph["gpu_hours"] == pytest.approx(2 * ph["macs"] / (0.4 * 312e12) / 3600)
    frozen = plan._phase_cost("phase1", 2.0, 16, {"frozen": True, "teacher": True}, costs, 100, SETTINGS)
    assert frozen["macs"] == (2 + 1) * fwd * 16 * 12                          # 2x frozen student + 1x teacher


def test_memory_grows_with_micro_batch_and_largest_fits():
    state, act, mem = 10 * plan.GIB, 0.5 * plan.GIB, 40.0
    peaks = [plan.peak_memory_bytes(state, act, m) for m in range(1, 10)]
    assert all(b > a for a, b in zip(peaks, peaks[1:]))
    m = plan.largest_micro_batch(state, act, mem)
    usable = plan.HEADROOM * mem * plan.GIB
    assert m == 52 and plan.peak_memory_bytes(state, act, m) <= usable < plan.peak_memory_bytes(state, act, m + 1)
    fit = plan.fit_batch(state, act, 256, 2, mem)      # 128 per GPU, at most 52 at once: 3 x 43
    assert (fit["mode"], fit["accum"], fit["micro"]) == ("ddp", 3, 43)
    assert fit["micro"] <= m and fit["micro"] * fit["accum"] >= 128
    big = plan.fit_batch(100 * plan.GIB, act, 8, 4, mem)                     # the state alone does not fit: FSDP
    assert big["fits"] and big["mode"] == "fsdp" and big["state_bytes"] == 25 * plan.GIB
    assert not plan.fit_batch(100 * plan.GIB, act, 8, 1, mem)["fits"]


def test_plan_memory_consistent_with_gpu_memory():
    """A real cell on a small GPU: the chosen micro-batch fits, one more sample would not."""
    p = plan.plan_table("upop_deit", "paper", gpus=8, gpu_memory=2.0, methods="somp", ratios="2.00x")
    (ph,) = p["cells"][0]["phases"]
    m = ph["memory"]
    usable = plan.HEADROOM * 2.0 * plan.GIB
    assert m["fits"] and m["share"] == 4096 // 8
    assert plan.peak_memory_bytes(m["state_bytes"], m["act_bytes"], m["max_micro"]) <= usable
    assert plan.peak_memory_bytes(m["state_bytes"], m["act_bytes"], m["max_micro"] + 1) > usable
    assert m["micro"] <= m["max_micro"] and m["accum"] == math.ceil(512 / m["max_micro"])
    assert m["micro"] * m["accum"] >= 512 and m["peak_bytes"] <= usable
    # more memory per GPU: fewer accumulation steps
    roomy = plan.plan_table("upop_deit", "paper", gpus=8, methods="somp", ratios="2.00x")["cells"][0]["phases"][0]
    assert roomy["memory"]["max_micro"] > m["max_micro"] and roomy["memory"]["accum"] <= m["accum"]


def test_cli_one_line_per_cell_and_totals(capsys):
    code = main(["plan", "--table", "upop_deit", "--profile", "paper", "--methods", "dense,somp",
                 "--ratios", "2.00x", "--gpus", "8"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    for cell in ("dense-1x-seed0", "somp-2.00x-seed0"):
        assert sum(1 for line in out if line.startswith(cell + " ")) == 1
    totals = [line for line in out if line.startswith("total: ")]
    assert len(totals) == 1 and "2 cells" in totals[0] and "GPU-hours" in totals[0] and "on 8 GPUs" in totals[0]
    assert any("somp-2.00x-seed0" in line and "finetune 93,600x4096" in line for line in out)
    assert any(line.startswith("note: published: DeiT paper") for line in out)


@pytest.mark.parametrize("value", ["0", "two", "1.5", "-3"])
def test_cli_bad_gpus_exits_2(capsys, value):
    code = main(["plan", "--table", "upop_deit", "--gpus", value])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: --gpus") and "Traceback" not in err
