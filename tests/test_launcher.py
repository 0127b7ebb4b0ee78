"""Cells as submitit jobs: `bench run --launcher local` (the job path, run here), the Slurm launcher's
parameters and submission (a fake sbatch/sacct on PATH), `bench status` along the way, data-parallel cells
refused until bench.distributed exists."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from bench.cli import main
from bench.errors import BenchError
from bench.launch import CellJob, LaunchOptions, parse_slurm_args, parse_time, read_jobs, slurm_parameters
from bench.status import slurm_job_state
from tests.tiny_cards import bench, records, tiny_env


def _use(monkeypatch, env):
    for k in ("BENCH_TABLES", "BENCH_CACHE", "BENCH_OUTPUT"):
        monkeypatch.setenv(k, env[k])


def _status(capsys, *extra):
    capsys.readouterr()
    assert main(["status", "--table", "tiny_deit", "--json", *extra]) == 0
    return {r["cell_id"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}


@pytest.mark.slow
def test_local_launcher_jobs_requeue_kill_rerun_resume_and_status(tmp_path, monkeypatch, capsys):
    env = tiny_env(tmp_path, methods=("dense", "somp"), finetune_epochs=4)   # 3 cells: dense, somp 1.11x, 1.67x
    _use(monkeypatch, env)
    out = tmp_path / "out" / "tiny_deit"
    rows = _status(capsys)
    assert [r["state"] for r in rows.values()] == ["not started"] * 3

    cmd = [sys.executable, "-m", "bench", "run", "--table", "tiny_deit", "--launcher", "local", "--workers", "1",
           "--checkpoint-every-steps", "1"]
    run = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = {c: set() for c in rows}
    requeued = killed = None
    deadline = time.time() + 400
    while run.poll() is None and time.time() < deadline:
        rows = _status(capsys)
        for c, r in rows.items():
            seen[c].add(r["state"])
        for c, r in rows.items():
            if not c.startswith("somp") or r["state"] != "running":
                continue
            owner = _owner(out, r["hash"])
            if owner is None:
                continue
            if requeued is None:                      # pre-empted: SIGUSR2 -> checkpoint() -> requeued
                requeued = (c, r["hash"], owner["pid"])
                _signal(owner["pid"], signal.SIGUSR2)
            elif c != requeued[0] and killed is None and list((out / "cells" / r["hash"]).rglob("finetune-step*.pt")):
                killed = (c, r["hash"], owner["pid"])  # in the middle of its finetune, after a checkpoint
                _signal(owner["pid"], signal.SIGKILL)
        time.sleep(0.05)
    first = run.communicate(timeout=300)[0]
    assert requeued and killed, first[-3000:]
    assert run.returncode == 1, first[-3000:]                     # one cell did not finish
    assert f"tiny_deit::{killed[0]} FAILED (job" in first and f"tiny_deit::{requeued[0]} NO-REF" in first, first
    assert any("running" in s for s in seen.values()) and any("queued" in s for s in seen.values()), seen

    rows = _status(capsys)
    assert rows[killed[0]]["state"] == "failed" and "without a result" in rows[killed[0]]["detail"], rows
    assert all(r["state"] == "done" and r["job"].startswith("local:") for c, r in rows.items() if c != killed[0])
    log = "".join(p.read_text() for p in (out / "jobs").rglob("*_log.out"))
    assert f"{requeued[0]}: pre-empted or timed out: requeued" in log and "attempt 2 (requeued)" in log
    capsys.readouterr()
    assert main(["report", "--table", "tiny_deit"]) == 0         # the table of what is done
    assert "| dense" in capsys.readouterr().out

    old_job = read_jobs(tmp_path / "out", "tiny_deit")[killed[1]]["job_id"]
    r = bench(env, *cmd[3:-4], "--workers", "2", "--checkpoint-every-steps", "1")   # run the command again
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("(reused)") == 2 and f"tiny_deit::{killed[0]} NO-REF [job" in r.stdout, r.stdout
    rec = records(out)[killed[1]]
    assert (rec["training"]["finetune"]["resumed_from_step"] or 0) >= 1, rec["training"]   # resumed inside the cell
    assert rec["runner"]["launcher"] == "local" and rec["runner"]["job_id"]
    entry = read_jobs(tmp_path / "out", "tiny_deit")[killed[1]]
    assert entry["previous"] == [f"local:{old_job}"] and entry["job_id"] != old_job
    rows = _status(capsys)
    assert all(r["state"] == "done" for r in rows.values()), rows
    assert "Throughput/s" in r.stdout and "wall time:" in r.stdout


def _owner(out, h):
    try:
        return json.loads((out / "records" / f"{h}.owner").read_text())
    except (OSError, ValueError):
        return None


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


FAKE = {
    "srun": "#!/bin/sh\nexit 0\n",
    "sbatch": "#!/bin/sh\ncp \"$1\" \"$FAKE_SLURM_DIR/submitted.sh\"\necho \"Submitted batch job 4242\"\n",
    "sacct": "#!/bin/sh\nprintf 'JobID|State|NodeList\\n4242_0|RUNNING|node1\\n4242_[1-4]|PENDING|\\n'\n",
}


def test_slurm_launcher_submits_a_job_array_with_its_parameters_and_status_reads_sacct(tmp_path, monkeypatch, capsys):
    env = tiny_env(tmp_path)
    _use(monkeypatch, env)
    fake = tmp_path / "fake_slurm"
    fake.mkdir()
    for name, text in FAKE.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755 | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(fake))
    code = main(["run", "--table", "tiny_deit", "--launcher", "slurm", "--gpus-per-cell", "1", "--partition", "gpu",
                 "--time", "02:00", "--account", "acc", "--qos", "high", "--mem", "32", "--cpus-per-gpu", "8",
                 "--workers", "2", "--slurm-arg", "constraint=a100"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "5 job(s) submitted (slurm)" in text and "bench status --table tiny_deit" in text
    script = (fake / "submitted.sh").read_text()
    for line in ["#SBATCH --array=0-4%2", "#SBATCH --gpus-per-node=1", "#SBATCH --partition=gpu",
                 "#SBATCH --time=120", "#SBATCH --account=acc", "#SBATCH --qos=high", "#SBATCH --mem=32GB",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --constraint=a100", "#SBATCH --signal=USR2@120",
                 "#SBATCH --job-name=bench-tiny_deit", "#SBATCH --ntasks-per-node=1"]:
        assert line in script, (line, script)
    jobs = read_jobs(tmp_path / "out", "tiny_deit")
    assert sorted(e["job_id"] for e in jobs.values()) == [f"4242_{i}" for i in range(5)]
    assert {e["launcher"] for e in jobs.values()} == {"slurm"} and {e["device"] for e in jobs.values()} == {"cuda"}
    rows = _status(capsys)                             # the device of the submitted cells is found in jobs.json
    states = sorted(r["state"] for r in rows.values())
    assert states == ["queued"] * 4 + ["running"], rows
    assert all(r["job"].startswith("slurm:4242_") for r in rows.values())


def test_slurm_parameters():
    opts = LaunchOptions("slurm", gpus_per_cell=4, partition="a100", time_min=parse_time("1-12:00"), account="lab",
                         qos="normal", mem_gb=256, cpus_per_gpu=10, max_parallel=8,
                         slurm_args=parse_slurm_args(["constraint=80gb", "--exclude=node3"]))
    p = slurm_parameters(opts, "upop_deit")
    assert p == {"job_name": "bench-upop_deit", "time": 2160, "nodes": 1, "ntasks_per_node": 1, "signal_delay_s": 120,
                 "stderr_to_stdout": True, "gpus_per_node": 4, "cpus_per_task": 40, "mem": "256GB", "partition": "a100",
                 "account": "lab", "qos": "normal", "array_parallelism": 8,
                 "additional_parameters": {"constraint": "80gb", "exclude": "node3"}}
    from submitit.slurm.slurm import _make_sbatch_string
    script = _make_sbatch_string(command="python -m submitit.core._submit x", folder="/tmp/x/%j", **p)
    assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --exclude=node3" in script
    assert slurm_parameters(LaunchOptions("slurm", gpus_per_cell=0), "t")["time"] == 24 * 60
    assert "gpus_per_node" not in slurm_parameters(LaunchOptions("slurm", gpus_per_cell=0), "t")


@pytest.mark.parametrize("text,minutes", [("45", 45), ("01:30", 90), ("1:00:30", 61), ("2-00:00", 2880), ("1-6", 1800)])
def test_parse_time(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("text", ["1:2:3:4", "abc", "0", "-5"])
def test_parse_time_refuses(text):
    with pytest.raises(BenchError, match="--time"):
        parse_time(text)


def test_slurm_states_map_to_cell_states():
    assert slurm_job_state("PENDING")[0] == "queued" and slurm_job_state("REQUEUED")[0] == "queued"
    assert slurm_job_state("RUNNING")[0] == "running"
    assert slurm_job_state("CANCELLED by 1234")[0] == "failed" and slurm_job_state("TIMEOUT")[0] == "failed"
    assert slurm_job_state("COMPLETED")[0] == "finished" and slurm_job_state(None)[0] == "unknown"


@pytest.mark.slow
def test_local_launcher_runs_a_cell_data_parallel_on_two_processes(tmp_path):
    """--gpus-per-cell 2: each job starts torchrun with 2 ranks (gloo on CPU); rank 0 writes the record, whose
    keep-masks were checked identical on both ranks."""
    env = tiny_env(tmp_path, methods=("dense", "somp"))
    r = bench(env, "run", "--table", "tiny_deit", "--ratios", "1.11x", "--launcher", "local", "--gpus-per-cell", "2",
              "--device", "cpu")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = records(tmp_path / "out" / "tiny_deit")
    assert len(recs) == 2, recs.keys()
    somp = next(rec for rec in recs.values() if rec["method"] == "somp")
    dp = somp["method_info"]["data_parallel"]
    assert dp["world_size"] == 2 and dp["keep_masks_identical"] is True, dp
    log = "".join(p.read_text() for p in (tmp_path / "out" / "tiny_deit" / "jobs").rglob("*_log.out"))
    assert "torchrun --nproc_per_node 2" in log and "on 2 processes" in log, log[-3000:]


@pytest.mark.parametrize("argv,needle", [
    (["--partition", "gpu"], "--partition: only with --launcher slurm"),
    (["--launcher", "local", "--account", "a"], "--account: only with --launcher slurm"),
    (["--wait"], "only with --launcher"),
    (["--workers", "0"], "--workers 0"),
    (["--gpus-per-cell", "2"], "--gpus-per-cell: only with --launcher"),
    (["--launcher", "slurm", "--slurm-arg", "novalue"], "--slurm-arg 'novalue'"),
])
def test_many_cells_flags_are_checked(capsys, argv, needle):
    code = main(["run", "--table", "upop_deit", *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err


def test_keyword_selects_cells_for_the_launchers():
    from bench.launch import keyword_filter
    cells = [{"cell_id": cid, "table": "tiny_deit", "method": cid.split("-")[0]}
             for cid in ("dense-1x-seed0", "somp-1.11x-seed0", "somp-1.67x-seed0", "upop-1.67x-seed0")]
    pick = lambda expr: [c["cell_id"] for c in keyword_filter(cells, expr)]   # noqa: E731
    assert pick("somp and 1.67x") == ["somp-1.67x-seed0"]
    assert pick("not somp") == ["dense-1x-seed0", "upop-1.67x-seed0"]
    assert pick(None) == [c["cell_id"] for c in cells]
    with pytest.raises(BenchError, match="-k"):
        keyword_filter(cells, "somp and (")
