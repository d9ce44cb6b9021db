#!/usr/bin/env python3
"""tools/bench, kept green: its harness (tools/bench.d/bench.py) against the binary under test.

A short run of every subject (nbdbridge, nbdfuse, qemu-storage-daemon, fio's nbd engine) must
measure every workload in every round, write results.json, summary.txt with the targets of
issue 4, and plot.png, and leave nothing mounted or running (on never-written exports,
`--never-written`); so must a run over TCP (`--tcp`), where every export is written once before
its mount (the default). A bridge that cannot start must fail the run loudly while the other
subjects still run. The speed itself is the benchmark's to report, never asserted here.
"""
import glob
import json
import os
import re
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

BENCH = os.path.join(h.REPO, "tools", "bench.d", "bench.py")
SUBJECTS = ["bridge", "nbdfuse", "qsd", "nbd"]
# Generous: each subject mounts and unmounts once per round, and the ASan build is slow.
RUN_DEADLINE = 150


def _bench_processes():
    """Mounts and servers a bench run may leave: FUSE mounts below its work directories, and
    nbdkit or FUSE servers whose command line names one."""
    mounts = [m["mountpoint"] for m in h.fuse_mounts() if "/nbdbridge-bench." in m["mountpoint"]]
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and "/nbdbridge-bench." in " ".join(h.proc_cmdline(int(entry))):
            pids.append(int(entry))
    return mounts, pids


def _run_bench(out, args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    cmd = [h.SYS_PYTHON, BENCH, "--bridge", h.NBDBRIDGE, "--out", out, *args]
    p = h.popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=RUN_DEADLINE)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the bench's own handler unmounts its subjects and stops their
        # servers, which a SIGKILL (as h.run would send) leaves behind.
        p.send_signal(signal.SIGTERM)
        try:
            p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            try:
                p.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                pass  # a grandchild in a session of its own holds the pipes: reported below
        mounts, pids = _bench_processes()
        raise h.TestFailure("the bench did not finish within %d s (left: mounts %r, pids %r): %r"
                            % (RUN_DEADLINE, mounts, pids, cmd))
    r = subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)
    mounts, pids = _bench_processes()
    h.check_eq(mounts, [], "FUSE mounts the bench left (output:\n%s)" % r.stderr[-2000:])
    h.check_eq(pids, [], "processes the bench left")
    return r


def test_every_subject_measures_every_workload():
    out = h.tmpdir("bench")
    # Never-written exports here: writing 1 GiB per instance first (the default,
    # checked over TCP below) would add ~5 s per instance on a slow machine.
    r = _run_bench(out, ["--never-written", "--rounds", "2", "--runtime", "1", "--workloads", "qd1,qd64"])
    h.check_eq(r.returncode, 0, "bench exit status (output ends:\n%s)" % r.stderr[-3000:])
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    h.check_eq(results["failures"], [], "failures")
    h.check_eq(results["meta"]["order"], "workloads", "default order")
    h.check_eq(results["meta"]["prefilled"], False, "--never-written")
    h.check_eq(glob.glob(os.path.join(out, "fio", "*-prefill.json")), [], "prefill runs with --never-written")
    measured = {(run["round"], run["subject"]): run for run in results["runs"]}
    for round_no in (1, 2):
        for subject in SUBJECTS:
            run = measured.get((round_no, subject))
            h.check(run is not None, "round %d ran %s" % (round_no, subject))
            h.check(run["ok"], "round %d %s ok: %r" % (round_no, subject, run["errors"]))
            for workload in ("qd1", "qd64"):
                cell = run["workloads"].get(workload)
                h.check(cell and cell["ios"] > 0 and cell["value"] > 0,
                        "round %d %s %s measured: %r" % (round_no, subject, workload, cell))
                if subject != "nbd":  # CPU time is the FUSE server's, read from its pid
                    h.check(cell["cpu_s"] > 0, "%s %s CPU time" % (subject, workload))
                h.check(cell["server_cpu_s"] > 0, "%s %s nbdkit's CPU time" % (subject, workload))
    for subject in SUBJECTS:
        server = results["summary"][subject]["workloads"]["qd64"]["server_cpu_us_per_io"]
        h.check(0 < server["min"] <= server["median"] <= server["max"],
                "%s's nbdkit CPU per I/O at depth 64: %r" % (subject, server))
    # Rounds rotate the order: the bridge went first in round 1, not in round 2.
    order = [run["subject"] for run in results["runs"]]
    h.check_eq(order[:4], SUBJECTS, "round 1 order")
    h.check_eq(order[4:8], SUBJECTS[1:] + SUBJECTS[:1], "round 2 order")
    qd64 = results["ratios"]["qd64"]
    h.check(qd64["bridge_over_nbd"] > 0 and qd64["per_round_bridge_over_nbd"]["min"] > 0,
            "depth-64 ratios: %r" % qd64)
    judged = {t["target"] for t in results["targets"]}
    h.check("qd64 bridge / best peer >= 2.5" in judged and "qd64 bridge / nbd >= 0.6" in judged,
            "targets judged: %r" % sorted(judged))
    with open(os.path.join(out, "summary.txt")) as f:
        summary = f.read()
    h.check("targets (issue 4)" in summary and "ratios within each round" in summary
            and "CPU time of the server (nbdkit) per I/O" in summary, "summary sections:\n%s" % summary)
    with open(os.path.join(out, "plot.png"), "rb") as f:
        h.check_eq(f.read(8), b"\x89PNG\r\n\x1a\n", "plot.png signature")


def test_every_subject_runs_over_tcp():
    out = h.tmpdir("bench")
    # (256 MiB exports: each is written whole once before its mount)
    r = _run_bench(out, ["--tcp", "--rounds", "1", "--runtime", "1", "--workloads", "qd1", "--export-mib", "256"])
    h.check_eq(r.returncode, 0, "bench exit status (output ends:\n%s)" % r.stderr[-3000:])
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    h.check_eq(results["meta"]["transport"], "tcp 127.0.0.1", "transport")
    # By default every export was written once, whole, before its subject mounted it.
    h.check_eq(results["meta"]["prefilled"], True, "written exports by default")
    for run in results["runs"]:
        for instance in run["instances"]:
            with open(os.path.join(out, "fio", instance["tag"] + "-prefill.json")) as f:
                report = f.read()  # fio's nbd engine may print lines before the JSON
            start = re.search(r"^\{", report, re.MULTILINE).start()
            written = json.loads(report[start:])["jobs"][0]["write"]["io_bytes"]
            h.check_eq(written, 256 << 20, "bytes written to %s's export before the mount" % instance["tag"])
    h.check_eq(sorted(run["subject"] for run in results["runs"]), sorted(SUBJECTS), "subjects run")
    for run in results["runs"]:
        h.check(run["ok"] and run["workloads"]["qd1"]["ios"] > 0,
                "%s measured over TCP: %r" % (run["subject"], run["errors"]))
        # The server listened on TCP only, so a subject that measured went through it.
        for instance in run["instances"]:
            h.check(instance["server"].startswith("nbd://127.0.0.1:"),
                    "%s's server: %r" % (run["subject"], instance["server"]))


def test_a_bridge_that_cannot_start_fails_the_run_loudly():
    out = h.tmpdir("bench")
    r = _run_bench(out, ["--never-written", "--rounds", "1", "--runtime", "1", "--workloads", "qd1",
                         "--subjects", "bridge,nbd"],
                   {"BRIDGE_ARGS": "--no-such-option"})
    h.check(r.returncode != 0, "bench exit status %d" % r.returncode)
    h.check("FAILED: round 1 bridge: mount" in r.stderr, "failure reported:\n%s" % r.stderr[-2000:])
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    nbd = [run for run in results["runs"] if run["subject"] == "nbd"]
    h.check(nbd and nbd[0]["workloads"]["qd1"]["ios"] > 0, "the other subject still ran")


def test_another_bridge_binary_runs_beside_the_bridge():
    # An A/B in one run: `bridge-other` is whatever binary --bridge-other names, and each
    # round reports it against `bridge`.
    out = h.tmpdir("bench")
    r = _run_bench(out, ["--never-written", "--rounds", "2", "--runtime", "1", "--workloads", "qd1",
                         "--subjects", "bridge,bridge-other", "--bridge-other", h.NBDBRIDGE])
    h.check_eq(r.returncode, 0, "bench exit status (output ends:\n%s)" % r.stderr[-3000:])
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    h.check_eq(results["meta"]["bridge-other"]["binary"], os.path.realpath(h.NBDBRIDGE), "bridge-other's binary")
    for run in results["runs"]:
        h.check(run["ok"] and run["workloads"]["qd1"]["ios"] > 0, "%s measured: %r" % (run["subject"], run["errors"]))
    h.check_eq(sorted(run["subject"] for run in results["runs"]), ["bridge", "bridge", "bridge-other", "bridge-other"],
               "subjects run, two rounds")
    with open(os.path.join(out, "summary.txt")) as f:
        summary = f.read()
    h.check(re.search(r"^qd1 .*\d\.\d\d \(\d\.\d\d-\d\.\d\d\)", summary, re.MULTILINE)
            and "bridge-other/bridge" in summary, "no bridge-other/bridge ratio per round:\n%s" % summary)
    missing = _run_bench(h.tmpdir("bench"), ["--quick", "--workloads", "qd1", "--subjects", "bridge,bridge-other"])
    h.check(missing.returncode != 0, "a run with bridge-other but no --bridge-other succeeded")
    h.check("needs --bridge-other" in missing.stderr, "error message: %s" % missing.stderr[-1000:])


if __name__ == "__main__":
    h.main(globals())
