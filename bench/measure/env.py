"""Measuring: the environment a result depends on (versions, git commit, device and CPU names).

`env_info` is written into every record; `_device_name` names the device `throughput` ran on.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

# ---------------------------------------------------------------------------------------------
# environment

def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str):
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _module_version(name: str):
    try:
        mod = __import__(name)
    except Exception:  # noqa: BLE001 - absent or broken installs both mean "not usable"
        return None
    return getattr(mod, "__version__", None)


def _git(*args) -> str | None:
    root = Path(__file__).resolve().parents[2]   # the repository root (this file is bench/measure/env.py)
    try:
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def env_info() -> dict:
    """Versions and hardware that a result depends on (written into every record)."""
    import timm

    cuda = torch.cuda.is_available()
    sha = _git("rev-parse", "HEAD")
    dirty = None
    if sha is not None:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": _version("transformers"),
        "open_clip": _version("open_clip_torch"),
        "fvcore": _version("fvcore"),
        "bench": _version("prune-bench"),
        "git_sha": sha,
        "git_dirty": dirty,
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,          # the CUDA torch was built with
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "device_name": torch.cuda.get_device_name(0) if cuda else _cpu_name(),
        "cpu_name": _cpu_name(),
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "pid_cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
