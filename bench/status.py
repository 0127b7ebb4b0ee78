"""`bench status --table T [--profile P]`: every cell of the card as done / running / queued / failed /
not started, from what is on disk (records, cell locks, jobs.json) and, for Slurm jobs, from sacct.

- done: a finished record (its status: pass / fail / no_ref);
- running: its cell lock is held by a live process (pid, host, worker or job named), or its Slurm job runs;
- queued: its job is submitted and waiting (Slurm PENDING; a local job waiting for a free slot);
- failed: an `error` record (the cell crashed: recomputed by the next run), or a job that ended without a
  record (killed, cancelled, timed out for good, node failure);
- not started: none of these.
"""
from __future__ import annotations

import pickle
import socket
import subprocess
from pathlib import Path

from bench.atomic import pid_alive

STATES = ("done", "running", "queued", "failed", "not started")
SLURM_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED",
                "SIGNALING", "STAGE_OUT"}
SLURM_RUNNING = {"RUNNING", "COMPLETING"}
SLURM_FINISHED = {"COMPLETED"}


def _local_controller_alive(job_id: str) -> bool:
    """A local submitit job's id is the pid of its controller process (`python -m submitit.local._local`)."""
    if not str(job_id).isdigit() or not pid_alive(int(job_id)):
        return False
    try:
        cmd = Path(f"/proc/{job_id}/cmdline").read_bytes()
    except OSError:
        return True                      # no /proc: trust the pid
    return b"submitit" in cmd


def _result(entry: dict):
    """("success", value) / ("error", traceback) of a job that ended normally, else None."""
    from submitit.core.utils import JobPaths
    path = JobPaths(entry["folder"], str(entry["job_id"]), 0).result_pickle
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception:   # noqa: BLE001 - unreadable result: treat as none
        return None


def local_job_state(entry: dict) -> tuple[str, str]:
    """(queued | running | finished | failed | unknown, detail) of a local submitit job."""
    res = _result(entry)
    if res is not None:
        kind, value = res
        if kind == "success":
            return "finished", "job finished"
        last = [ln for ln in str(value).strip().splitlines() if ln.strip()]
        return "failed", f"job raised: {last[-1] if last else '?'}"
    if entry.get("host") not in (None, socket.gethostname()):
        return "unknown", f"local job on {entry['host']}"
    if _local_controller_alive(entry["job_id"]):
        return "queued", "job started, waiting for a free slot"
    return "failed", "job ended without a result (killed?)"


def slurm_states(job_ids: list) -> dict:
    """{job_id: sacct state} for Slurm job ids ("123" or "123_4"); {} when sacct is not there."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["sacct", "-j", ",".join(sorted({str(j).split("_")[0] for j in job_ids})),
                              "-o", "JobID,State,NodeList", "--parsable2"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0:
        return {}
    from submitit.slurm.slurm import SlurmInfoWatcher
    info = SlurmInfoWatcher().read_info(out.stdout)
    return {j: info[str(j)]["State"] for j in job_ids if str(j) in info}


def slurm_job_state(raw: str | None) -> tuple[str, str]:
    if not raw:
        return "unknown", "not in sacct"
    word = raw.split()[0].upper()     # "CANCELLED by 123"
    if word in SLURM_QUEUED:
        return "queued", raw
    if word in SLURM_RUNNING:
        return "running", raw
    if word in SLURM_FINISHED:
        return "finished", raw
    return "failed", raw


def cell_states(cells: list, output: Path) -> list:
    """One row per cell: {cell_id, hash, state, detail, job} (job: "launcher:id" or None)."""
    from bench.launch import read_jobs
    from bench.locks import cell_lock_path, is_locked, read_owner
    from bench.records import read_record, record_path

    jobs = {}
    for table in dict.fromkeys(c["table"] for c in cells):
        jobs.update(read_jobs(output, table))
    sacct = slurm_states([e["job_id"] for c in cells if (e := jobs.get(c["hash"])) and e["launcher"] == "slurm"])
    rows = []
    for c in cells:
        rec = read_record(record_path(output, c["table"], c["hash"]))
        entry = jobs.get(c["hash"])
        job = f"{entry['launcher']}:{entry['job_id']}" if entry else None
        lock = cell_lock_path(output, c["table"], c["hash"])
        if rec is not None and rec.get("status") != "error":
            state, detail = "done", rec["status"]
        elif is_locked(lock):
            owner = read_owner(lock) or {}
            state = "running"
            detail = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
            if owner.get("worker"):
                detail += f", worker {owner['worker']}"
            if owner.get("job_id") and entry is None:
                job = f"{owner.get('launcher') or 'job'}:{owner['job_id']}"
            if owner.get("since_utc"):
                detail += f", since {owner['since_utc']}"
        elif entry is not None:
            kind, raw = (slurm_job_state(sacct.get(entry["job_id"])) if entry["launcher"] == "slurm"
                         else local_job_state(entry))
            if kind in ("queued", "running"):
                state, detail = kind, raw
            elif rec is not None:    # an error record
                state, detail = "failed", f"error: {rec.get('reason')}"
            elif kind == "failed":
                state, detail = "failed", raw
            elif kind == "finished":
                state, detail = "failed", "job finished without a record"
            else:
                state, detail = "not started", raw
        elif rec is not None:
            state, detail = "failed", f"error: {rec.get('reason')}"
        else:
            state, detail = "not started", ""
        rows.append({"cell_id": c["cell_id"], "hash": c["hash"], "state": state, "detail": detail, "job": job})
    return rows


def format_rows(rows: list, title: str) -> str:
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    head = f"{title}: {len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    w = max([len("cell")] + [len(r["cell_id"]) for r in rows])
    wj = max([len("job")] + [len(r["job"] or "-") for r in rows])
    lines = [head, f"{'cell':{w}}  {'state':11}  {'job':{wj}}  detail", f"{'-' * w}  {'-' * 11}  {'-' * wj}  ------"]
    for r in rows:
        lines.append(f"{r['cell_id']:{w}}  {r['state']:11}  {(r['job'] or '-'):{wj}}  {r['detail']}")
    return "\n".join(lines)
