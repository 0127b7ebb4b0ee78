"""Many processes on one output folder: pytest-xdist workers (`bench run --workers 2`), two concurrent
`bench run` of one card, and the locks behind them (a cell computed once, a dense model trained once, a lock
file left by a killed process never blocking)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from bench.locks import cell_lock_path, held, is_locked, lock_path_for, read_owner
from bench.structure import write_json_atomic
from tests.tiny_cards import bench, dense_trainings, records, tiny_env

pytestmark = pytest.mark.slow

COMPARED = ("metrics", "params")


def _cell_lines(stdout: str) -> dict:
    """{cell_id: "NO-REF" / "NO-REF (reused)" / ...} from pytest's verbose lines (serial or xdist)."""
    out = {}
    for line in stdout.splitlines():
        for word in ("NO-REF", "PASSED", "FAILED"):
            if f" {word}" in line and "tiny_deit.yaml::" in line:
                tail = line.split("tiny_deit.yaml::", 1)[1]
                cell = tail.split()[0]
                if word in line.split("tiny_deit.yaml::", 1)[0] or word in tail:
                    out[cell] = word + (" (reused)" if "(reused)" in line else "")
    return out


def test_two_workers_split_the_cells_train_the_dense_model_once_and_match_a_serial_run(tmp_path):
    serial_env = tiny_env(tmp_path, out="out_serial", cache="cache_serial")
    workers_env = tiny_env(tmp_path, out="out_workers", cache="cache_workers")
    r1 = bench(serial_env, "run", "--table", "tiny_deit")
    assert r1.returncode == 0, r1.stdout[-3000:] + r1.stderr[-3000:]
    r2 = bench(workers_env, "run", "--table", "tiny_deit", "--workers", "2", "-s")
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "2 workers [5 items]" in r2.stdout
    # the table, CSV and plot are built once, on the controller, from the records the workers wrote
    assert r2.stdout.count("Throughput/s") == 1 and "leaderboard CSV:" in r2.stdout
    out = tmp_path / "out_workers" / "tiny_deit"
    assert (out / "tiny_deit-micro.png").is_file() and len(list(out.glob("tiny_deit-micro-*.csv"))) == 1
    # -s lines of the workers reach the terminal, prefixed with the worker id
    assert "[gw0]" in r2.stderr and "[gw1]" in r2.stderr
    # the dense model is trained once (the other worker waits for it, then loads it)
    assert dense_trainings(r2.stdout + r2.stderr) == 1
    assert len(list((tmp_path / "cache_workers" / "dense").glob("*/training.json"))) == 1

    serial, parallel = records(tmp_path / "out_serial" / "tiny_deit"), records(out)
    assert len(serial) == len(parallel) == 5 and set(serial) == set(parallel)
    workers = {r["runner"]["worker"] for r in parallel.values()}
    assert workers == {"gw0", "gw1"}, workers                       # the cells were split between workers
    assert len({r["runner"]["pid"] for r in parallel.values()}) == 2
    for h, rec in serial.items():                                    # same numbers as one process
        assert rec["runner"]["worker"] is None
        for key in COMPARED:
            assert parallel[h][key] == rec[key], (rec["cell_id"] if "cell_id" in rec else rec["method"], key)
        assert parallel[h]["flops"]["macs"] == rec["flops"]["macs"]


def test_two_concurrent_runs_compute_every_cell_once(tmp_path):
    env = tiny_env(tmp_path)
    cmd = [sys.executable, "-m", "bench", "run", "--table", "tiny_deit", "-s"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, o[-3000:] + e[-3000:]
    lines = [_cell_lines(o) for o, _ in outs]
    assert all(len(ls) == 5 for ls in lines), lines                 # each run reports every cell
    computed = [sum(not v.endswith("(reused)") for v in ls.values()) for ls in lines]
    assert sum(computed) == 5, lines                                 # ... and each cell is computed once
    assert dense_trainings("".join(o + e for o, e in outs)) == 1
    out = tmp_path / "out" / "tiny_deit"
    recs = records(out)                                              # every record parses
    assert len(recs) == 5 and all(r["status"] == "no_ref" and r["metrics"] for r in recs.values())
    pids = [r["runner"]["pid"] for r in recs.values()]
    assert set(pids) <= {p.pid for p in procs}
    assert sorted(pids.count(p.pid) for p in procs) == sorted(computed)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.owner"))


HOLDER = """
import sys, time
from bench.locks import held
with held(sys.argv[1], "test", write_owner=True):
    with held(sys.argv[2], "test dense", write_owner=True):
        print("held", flush=True)
        time.sleep(600)
"""


def test_a_lock_file_left_by_a_killed_process_does_not_block(tmp_path, monkeypatch):
    env = tiny_env(tmp_path)
    for k in ("BENCH_TABLES", "BENCH_CACHE", "BENCH_OUTPUT"):
        monkeypatch.setenv(k, env[k])
    from bench.runner import expand_cells, load_checked_card
    cell = expand_cells(load_checked_card("tiny_deit"), "micro", "dense", None, "0", "cpu")[0]
    out = tmp_path / "out"
    lock = cell_lock_path(out, "tiny_deit", cell["hash"])
    dense_lock = tmp_path / "cache" / "dense" / "any.lock"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(dense_lock)], env=env,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    assert is_locked(lock) and read_owner(lock)["pid"] == p.pid
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert lock.exists() and lock.with_suffix(".owner").exists()     # the files stay behind ...
    assert not is_locked(lock) and not is_locked(dense_lock)         # ... but nobody holds the locks
    t0 = time.perf_counter()
    with held(lock, "test"):
        pass
    assert time.perf_counter() - t0 < 2
    r = bench(env, "status", "--table", "tiny_deit", "--json")
    rows = {json.loads(ln)["cell_id"]: json.loads(ln) for ln in r.stdout.splitlines()}
    assert rows["dense-1x-seed0"]["state"] == "not started", r.stdout
    r = bench(env, "run", "--table", "tiny_deit", "--methods", "dense")
    assert r.returncode == 0 and "dense-1x-seed0 NO-REF" in r.stdout and "(reused)" not in r.stdout, r.stdout[-2000:]


def test_held_lock_is_seen_from_another_process_and_waited_for(tmp_path):
    lock = lock_path_for(tmp_path / "records" / "abc.json")
    assert lock.name == "abc.lock"
    logs = []
    with held(lock, "cell x", write_owner=True):
        probe = subprocess.run([sys.executable, "-c", f"from bench.locks import is_locked; print(is_locked({str(lock)!r}))"],
                               capture_output=True, text=True)
        assert probe.stdout.strip() == "True"
        assert read_owner(lock)["pid"] == os.getpid()
        done = []

        def other():
            with held(lock, "cell x", log=logs.append):
                done.append(time.perf_counter())
        t = threading.Thread(target=other)
        t0 = time.perf_counter()
        t.start()
        time.sleep(0.5)
        assert not done                                   # the other holder waits ...
    t.join(10)
    assert done and done[0] - t0 >= 0.5                   # ... until this one releases it
    assert logs and "waiting for cell x" in logs[0] and f"pid {os.getpid()}" in logs[0]
    assert not is_locked(lock) and not lock.with_suffix(".owner").exists()


def test_atomic_json_writes_from_many_threads_do_not_collide(tmp_path):
    """Temp names are unique per call, not only per process: threads (or two runs) writing one file race safely."""
    path = tmp_path / "x" / "same.json"
    errors = []

    def writer(i):
        try:
            for k in range(60):
                write_json_atomic(path, {"writer": i, "k": k, "pad": "x" * 2000})
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    assert json.loads(path.read_text())["k"] == 59
    assert not list(path.parent.glob(".*.tmp"))

