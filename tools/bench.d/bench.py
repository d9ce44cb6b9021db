#!/usr/bin/python3
"""The body of tools/bench: runs fio through each subject against fresh nbdkit memory exports.

Normally started by tools/bench, which installs the packages and builds nbdbridge first. Needs
Debian's /usr/bin/python3 (for python3-matplotlib). Every subject process and server is started
in its own session, so a Ctrl-C reaches only this script, which then unmounts and stops them all.
"""
import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

EXPORT_SIZE = "1G"
EXPORT_BYTES = 1 << 30
SUBJECTS = ("bridge", "nbdfuse", "qsd", "nbd")
PEERS = ("nbdfuse", "qsd")
FUSE_SUBJECTS = ("bridge", "nbdfuse", "qsd", "bridge-nostats", "bridge-threads", "bridge-other")
# Not run by default: nbdbridge built with -DNBDBRIDGE_STATISTICS=OFF, to measure
# what recording statistics costs (tools/bench builds it into build-nostats/);
# the same binary as `bridge` with a thread per NBD connection; and any other
# nbdbridge binary (--bridge-other: an older commit, an experiment) for an A/B
# side by side with `bridge` in one run.
OPTIONAL_SUBJECTS = ("bridge-nostats", "bridge-threads", "bridge-other")
CLK_TCK = os.sysconf("SC_CLK_TCK")

SERVER_START_DEADLINE = 15   # seconds for nbdkit to accept connections
TCP_PORT_ATTEMPTS = 3       # free ports tried for nbdkit with --tcp (one may be taken meanwhile)
MOUNT_DEADLINE = 20          # seconds for a subject's file to appear on a FUSE mount
FIO_GRACE = 30               # seconds fio may take beyond --runtime before `timeout` ends it
STOP_DEADLINE = 20           # seconds for a subject to exit after it was asked to unmount


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    ioengine: str  # for the FUSE subjects; the nbd subject always uses fio's nbd engine
    iodepth: int
    direct: bool
    metric: str  # "iops", or "read"/"write" for bandwidth in MiB/s

    @property
    def unit(self):
        return "IOPS" if self.metric == "iops" else "MiB/s"

    @property
    def description(self):
        pattern = {"randrw": "random 50/50 read/write", "randread": "random read",
                   "read": "sequential read", "write": "sequential write"}[self.rw]
        cache = "O_DIRECT" if self.direct else "buffered"
        return f"{self.bs} {pattern}, {self.ioengine} {cache}, depth {self.iodepth}"


WORKLOADS = (
    Workload("qd1", "randrw", "4k", "psync", 1, False, "iops"),
    Workload("qd1d", "randrw", "4k", "psync", 1, True, "iops"),
    Workload("qd64", "randrw", "4k", "io_uring", 64, True, "iops"),
    Workload("rd64", "randread", "4k", "io_uring", 64, True, "iops"),
    Workload("seqr", "read", "1M", "io_uring", 8, True, "read"),
    Workload("seqw", "write", "1M", "io_uring", 8, True, "write"),
    Workload("seqrb", "read", "1M", "psync", 1, False, "read"),
    # Not run by default (the set is the default): a file read in small buffered
    # pieces, as dd, md5sum or gzip do, where nbdbridge's read-ahead answers under
    # --cache=none and the peers' page cache under theirs.
    Workload("seqr4kb", "read", "4k", "psync", 1, False, "read"),
)
WORKLOAD_BY_NAME = {w.name: w for w in WORKLOADS}
OPTIONAL_WORKLOADS = ("seqr4kb",)
RSS_WORKLOAD = "qd64"  # peak RSS is read at the end of this workload


class BenchError(Exception):
    """A subject or server that did not start, mount, run or stop as it should."""


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP: stop measuring, clean up, exit non-zero."""


def log(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes and mounts

class Child:
    """A background process leading its own process group, its output in a log file."""

    started = []  # every Child, so that the end of the run can stop any left behind
    # Each child leads its own process group, so that stop() reaches all of it. By default
    # it stays in our session: with the kernel's scheduler autogroups (one per session),
    # a session of its own would give every server and subject an equal CPU share of its
    # own, unlike the reference harness, which starts everything from one shell.
    grouping = {"process_group": 0}

    def __init__(self, name, argv, log_path):
        self.name, self.argv, self.log_path = name, argv, log_path
        with open(log_path, "wb") as out:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, **Child.grouping)
        self.pid = self.popen.pid
        self.exit_note = None  # how it ended, once it has
        Child.started.append(self)

    def alive(self):
        return self.popen.poll() is None

    def log_tail(self, lines=15):
        try:
            text = Path(self.log_path).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join("    | " + line for line in text[-lines:])

    def died_message(self):
        tail = self.log_tail()
        return (f"{self.name} (pid {self.pid}) exited with status {self.popen.returncode}"
                + (f"; its output ends:\n{tail}" if tail else "; it printed nothing"))

    def wait(self, seconds):
        try:
            self.popen.wait(timeout=seconds)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self, sig=signal.SIGTERM, grace=5):
        """Signal, then SIGKILL after `grace` seconds. Notes how it ended."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            if not self.wait(grace):
                self.exit_note = f"needed SIGKILL ({signal.Signals(sig).name} was ignored for {grace}s)"
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.wait(10)
        if self.exit_note is None:
            self.exit_note = f"exit status {self.popen.returncode}"


def wait_until(what, ready, deadline, watch=()):
    """Polls ready() until it is true; fails if a watched Child dies or the deadline passes."""
    end = time.monotonic() + deadline
    while not ready():
        for child in watch:
            if not child.alive():
                raise BenchError(f"{what}: {child.died_message()}")
        if time.monotonic() > end:
            raise BenchError(f"{what}: not ready after {deadline}s")
        time.sleep(0.05)


def unescape_mountinfo(field):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def fuse_mount(path):
    """The FUSE connection number (the device minor) of the FUSE mount at `path`, or None."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            before, _, after = line.partition(" - ")
            fields = before.split()
            if unescape_mountinfo(fields[4]) == path and after.startswith("fuse"):
                return int(fields[2].split(":")[1])
    return None


def mounts_under(directory):
    prefix = directory.rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        found = [unescape_mountinfo(line.split()[4]) for line in f]
    return [m for m in found if m.startswith(prefix)]


def abort_fuse_connection(path):
    """Every request waiting on the FUSE server of `path` fails at once, and so do new ones."""
    connection = fuse_mount(path)
    if connection is not None:
        with contextlib.suppress(OSError):
            Path(f"/sys/fs/fuse/connections/{connection}/abort").write_text("1")


def force_unmount(path):
    """Last resort for a mount whose process hangs: abort the FUSE connection, detach the mount."""
    abort_fuse_connection(path)
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(["umount", "-l", path], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=15, check=False)


def free_tcp_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def holds_dev_fuse(pid):
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == "/dev/fuse":
                return True
    return False


def cpu_ticks(pid):
    """utime + stime of the process (all its threads), in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
    return int(fields[11]) + int(fields[12])


def vmhwm_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


# ---------------------------------------------------------------- servers and subjects

class Server:
    """A fresh `nbdkit memory 1G` on a private unix socket, or with tcp on a free port of
    127.0.0.1 (nbd://127.0.0.1: the same server behind the loopback TCP stack)."""

    def __init__(self, run_dir, log_dir, tag, tcp=False):
        pidfile = f"{run_dir}/nbdkit.pid"  # nbdkit writes it once it accepts connections
        log_path = f"{log_dir}/{tag}-nbdkit.log"
        if not tcp:
            self.socket = f"{run_dir}/nbd.sock"
            self.uri = f"nbd+unix:///?socket={self.socket}"
            self.qemu_address = f"server.type=unix,server.path={self.socket}"
            self._start(["-U", self.socket], pidfile, log_path, lambda: os.path.exists(self.socket))
            return
        # A port picked here may be taken before nbdkit binds it: then nbdkit exits at once
        # and another port is tried.
        for attempt in range(TCP_PORT_ATTEMPTS):
            port = free_tcp_port()
            self.uri = f"nbd://127.0.0.1:{port}/"
            self.qemu_address = f"server.type=inet,server.host=127.0.0.1,server.port={port}"
            try:
                self._start(["-i", "127.0.0.1", "-p", str(port)], pidfile, log_path, lambda: True)
                return
            except BenchError:
                if attempt + 1 == TCP_PORT_ATTEMPTS:
                    raise

    def _start(self, listen, pidfile, log_path, listening):
        self.child = Child("nbdkit", ["nbdkit", "-f", "--exit-with-parent", "-P", pidfile,
                                      *listen, "memory", EXPORT_SIZE], log_path)
        try:
            wait_until("nbdkit", lambda: os.path.exists(pidfile) and listening(),
                       SERVER_START_DEADLINE, [self.child])
        except BenchError:
            self.stop()
            raise

    def stop(self):
        self.child.stop()


class Mount:
    """One FUSE subject serving the export as a file; stop() unmounts it and ends the process."""

    def __init__(self, subject, bridge_argv, server, run_dir, log_dir, tag, wrapped=False):
        # wrapped: started under a wrapper (heaptrack) whose pid is not the FUSE server's
        self.subject, self.wrapped = subject, wrapped
        directory = f"{run_dir}/mnt"
        if subject == "qsd":  # qemu's FUSE export mounts over a regular file
            self.mountpoint = self.file = directory
            Path(directory).touch()
            argv = ["qemu-storage-daemon",
                    "--blockdev", f"driver=nbd,node-name=disk,{server.qemu_address}",
                    "--export", f"type=fuse,id=export,node-name=disk,mountpoint={directory},"
                                "writable=on"]
        else:
            os.mkdir(directory)
            self.mountpoint, self.file = directory, f"{directory}/nbd"
            program = bridge_argv[subject] if subject in bridge_argv else ["nbdfuse"]
            argv = [*program, directory, server.uri]
        self.child = Child(subject, argv, f"{log_dir}/{tag}-{subject}.log")
        self.pid = self.child.pid
        try:
            self._check()
        except BaseException:
            self.stop()
            raise

    def _check(self):
        wait_until(f"{self.subject} mount", self._mounted, MOUNT_DEADLINE, [self.child])
        size = os.stat(self.file).st_size
        if size != EXPORT_BYTES:
            raise BenchError(f"{self.subject}: {self.file} is {size} bytes, not {EXPORT_BYTES}")
        if not self.wrapped and not holds_dev_fuse(self.pid):
            raise BenchError(f"{self.subject}: pid {self.pid} does not hold /dev/fuse, so its CPU "
                             "time would not be the FUSE server's")

    def abort(self):
        """Frees a process stuck on this mount (the subject stopped answering)."""
        abort_fuse_connection(self.mountpoint)
        time.sleep(0.5)  # let the freed fio exit and close the file

    def _mounted(self):
        return fuse_mount(self.mountpoint) is not None and os.path.exists(self.file)

    def stop(self):
        """Unmounts the way a user would (qsd: SIGTERM; others: fusermount3 -u), with deadlines."""
        if not self.child.alive() and fuse_mount(self.mountpoint) is None:
            self.child.exit_note = self.child.exit_note or f"exit status {self.child.popen.returncode}"
        elif not self.child.alive():
            self.child.exit_note = f"died while mounted: {self.child.died_message()}"
        elif self.subject == "qsd":
            self.child.stop(signal.SIGTERM, grace=STOP_DEADLINE)
        else:
            try:
                done = subprocess.run(["fusermount3", "-u", self.mountpoint], capture_output=True,
                                      text=True, timeout=STOP_DEADLINE, check=False)
                failure = done.stderr.strip() if done.returncode else None
            except subprocess.TimeoutExpired:
                failure = f"it hung for {STOP_DEADLINE}s"
            if failure:
                self.child.exit_note = f"fusermount3 -u failed: {failure}"
            elif not self.child.wait(STOP_DEADLINE):
                self.child.exit_note = f"still running {STOP_DEADLINE}s after its unmount"
            self.child.stop(grace=STOP_DEADLINE)
        if fuse_mount(self.mountpoint) is not None:
            force_unmount(self.mountpoint)
            self.child.stop(signal.SIGKILL)
            self.child.exit_note = (self.child.exit_note or "") + "; left mounted, unmounted by force"


# ---------------------------------------------------------------- fio

class FioHung(BenchError):
    """fio outlived its deadline: the subject stopped answering."""


def fio_argv(workload, runtime, subject, target, output, as_processes=False):
    # --thread: one fio process, so that `timeout` can end all of it (fio's job processes
    # are session leaders of their own, out of reach of a process-group kill) and the job
    # shares the bench's scheduler autogroup. --fio-processes drops it: the job then runs in
    # an autogroup of its own, which moves the results (README, "Performance").
    threading = [] if as_processes else ["--thread"]
    argv = ["fio", *threading, f"--name={workload.name}", f"--rw={workload.rw}",
            f"--bs={workload.bs}", f"--iodepth={workload.iodepth}", f"--runtime={runtime}",
            "--time_based=1", "--output-format=json", f"--output={output}"]
    if subject == "nbd":
        argv += ["--ioengine=nbd", f"--uri={target}"]
    else:
        argv += [f"--ioengine={workload.ioengine}", f"--direct={int(workload.direct)}",
                 f"--filename={target}"]
    return argv


def run_fio(argv, runtime, output, messages_path):
    """Runs fio under `timeout`; returns its one job's JSON report."""
    deadline = runtime + FIO_GRACE
    with open(messages_path, "wb") as messages_file:
        proc = subprocess.Popen(["timeout", "--kill-after=5", str(deadline), *argv],
                                stdin=subprocess.DEVNULL, stdout=messages_file,
                                stderr=subprocess.STDOUT)
        try:
            returncode = proc.wait(timeout=deadline + 15)
        except BaseException:  # our own deadline, or Ctrl-C: end fio before anything else
            proc.terminate()   # `timeout` passes SIGTERM on to fio
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            if "--thread" not in argv:
                # A job process outside fio's process group that outlived fio.
                subprocess.run(["pkill", "-KILL", "-f", f"--output={output}"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, check=False)
    messages = summarise_messages(Path(messages_path).read_text(errors="replace"))
    if returncode in (124, 137, -signal.SIGKILL):  # timed out (and maybe killed)
        raise FioHung(f"fio hung: still running {deadline}s into a {runtime}s run"
                      + (f"; fio said: {messages}" if messages else ""))
    try:
        report = Path(output).read_text()
        start = re.search(r"^\{", report, re.MULTILINE)  # engines may print lines before it
        job = json.loads(report[start.start() if start else 0:])["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise BenchError(f"fio exited {returncode} without a usable report ({e}): {messages}")
    if returncode != 0 or job.get("error"):
        raise BenchError(f"fio exited {returncode}, job error {job.get('error')}: {messages}")
    return job


def summarise_messages(text, keep=4):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) > keep:
        lines = lines[:keep] + [f"... ({len(lines) - keep} more lines)"]
    return " / ".join(lines)


def measure(workload, job):
    read, write = job["read"], job["write"]
    ios = read["total_ios"] + write["total_ios"]
    if workload.metric == "iops":
        value = read["iops"] + write["iops"]
    else:
        value = job[workload.metric]["bw_bytes"] / 2**20
    return {"value": value, "ios": ios,
            "read_iops": read["iops"], "write_iops": write["iops"],
            "read_mib_s": read["bw_bytes"] / 2**20, "write_mib_s": write["bw_bytes"] / 2**20,
            "read_ios": read["total_ios"], "write_ios": write["total_ios"],
            "runtime_ms": job["job_runtime"]}


# ---------------------------------------------------------------- one subject, one round

class SubjectRound:
    """One subject's part of one round: a fresh server (and mount) that runs the round's
    workloads in order, one run() at a time, so that subjects can take turns per workload. When
    a workload fails, the rest run on another fresh server and mount, so one failure hides
    nothing else; a server or mount that does not even start ends the subject's round."""

    def __init__(self, subject, round_no, config, dirs, runs):
        self.subject, self.round_no, self.config, self.dirs = subject, round_no, config, dirs
        self.record = {"round": round_no, "subject": subject, "ok": False, "errors": [],
                       "instances": [], "workloads": {}}
        runs.append(self.record)  # now, so that an interrupted run keeps what it measured
        self.pending = [w.name for w in config["workloads"]]
        self.given_up = False
        self.cleanup = None  # the running instance's ExitStack: stops its mount, then its server
        self.server = self.mount = self.instance = self.run_dir = None

    def run(self, workload):
        if self.given_up or workload.name not in self.pending:
            return
        if self.cleanup is None and not self._start():
            self.given_up = True
            return
        self.pending.remove(workload.name)
        self.instance["workloads"].append(workload.name)
        tag = self.instance["tag"]
        try:
            result = run_workload(workload, self.subject, self.server, self.mount, tag,
                                  self.config, self.dirs)
        except BenchError as e:
            if isinstance(e, FioHung) and self.mount:
                self.mount.abort()  # frees the fio stuck in the FUSE connection
            self._fail(workload.name, e)
            self._stop()
            return
        self.record["workloads"][workload.name] = result
        log(f"  {tag:<12} {workload.name:<6} {result['value']:>10.0f} {workload.unit}")

    def close(self):
        """Stops what still runs and settles the record; safe to call more than once."""
        self._stop()
        for name in self.pending:
            self.record["errors"].append(f"{name}: not run")
        self.pending = []
        self.record["ok"] = not self.record["errors"]

    def _start(self):
        number = len(self.record["instances"]) + 1
        tag = f"r{self.round_no}-{self.subject}" + (f"-{number}" if number > 1 else "")
        self.instance = {"tag": tag, "pid": None, "exit": None, "workloads": []}
        self.record["instances"].append(self.instance)
        self.run_dir = tempfile.mkdtemp(prefix=f"{tag}.", dir=self.dirs["work"])
        self.cleanup = contextlib.ExitStack()
        step = "start"
        try:
            self.server = Server(self.run_dir, self.dirs["logs"], tag, self.config["tcp"])
            self.cleanup.callback(self.server.stop)
            self.instance["server"] = self.server.uri
            if self.config["prefill"]:
                step = "prefill"
                prefill(self.server, f"{self.dirs['fio']}/{tag}-prefill")
            step = "mount"
            if self.subject != "nbd":
                self.mount = Mount(self.subject, self.config.get("bridge_argv", {}), self.server,
                                   self.run_dir, self.dirs["logs"], tag)
                self.cleanup.callback(self.mount.stop)
                self.instance["pid"] = self.mount.pid
            return True
        except BenchError as e:
            self._fail(step, e)
            self._stop()
            return False

    def _fail(self, step, error):
        """Records an error with what the server and the subject said last."""
        message = str(error)
        for child in (self.server and self.server.child, self.mount and self.mount.child):
            said = child and step not in ("start", "mount") and child.log_tail(5)
            if said:
                message += f"\n  {child.name}'s output ends:\n{said}"
        self.record["errors"].append(f"{step}: {message}")
        log(f"  {self.instance['tag']} {step}: FAILED: {message}")

    def _stop(self):
        if self.cleanup is None:
            return
        cleanup, mount, run_dir = self.cleanup, self.mount, self.run_dir
        self.cleanup = self.server = self.mount = None
        try:
            cleanup.close()
        finally:
            if mount:
                self.instance["exit"] = mount.child.exit_note
        exit_note = self.instance["exit"]
        if self.subject == "bridge" and mount and exit_note != "exit status 0":
            self.record["errors"].append(f"nbdbridge did not stop cleanly: {exit_note}")
        elif exit_note and not exit_note.startswith("exit status"):
            log(f"  {self.instance['tag']}: note: {self.subject} {exit_note}")
        if not mounts_under(run_dir):  # never recurse into a live mount
            shutil.rmtree(run_dir, ignore_errors=True)


def run_round(round_no, order, config, dirs, runs):
    """Every subject through every workload. By default the subjects take turns per workload,
    all mounted at once, so the subjects compared ran seconds apart rather than minutes (the
    machine's speed drifts by up to 20% between minutes here); with --order subjects each runs
    all its workloads before the next starts."""
    with contextlib.ExitStack() as stack:
        parts = []
        for subject in order:
            part = SubjectRound(subject, round_no, config, dirs, runs)
            stack.callback(part.close)
            parts.append(part)
        if config["order"] == "subjects":
            for part in parts:
                for workload in config["workloads"]:
                    part.run(workload)
                part.close()
        else:
            for workload in config["workloads"]:
                for part in parts:
                    part.run(workload)


def run_workload(workload, subject, server, mount, tag, config, dirs):
    try:
        return measure_workload(workload, subject, server, mount, tag, config, dirs)
    except OSError as e:  # /proc/PID of a process that is gone
        for child in [server.child] + ([mount.child] if mount else []):
            if not child.alive():
                raise BenchError(child.died_message()) from e
        raise


def prefill(server, path):
    """Writes the whole export once, straight to the server, before any subject mounts it:
    on a fresh nbdkit memory export the first write to each page costs the server an
    allocation, which a disk in use has long paid."""
    argv = ["fio", "--thread", "--name=prefill", "--rw=write", "--bs=1M", "--iodepth=8",
            "--ioengine=nbd", f"--uri={server.uri}", "--output-format=json", f"--output={path}.json"]
    run_fio(argv, 60, f"{path}.json", f"{path}.log")


def measure_workload(workload, subject, server, mount, tag, config, dirs):
    """fio once, with the CPU time the subject and the server spent meanwhile."""
    for child in [server.child] + ([mount.child] if mount else []):
        if not child.alive():
            raise BenchError(child.died_message())
    output = f"{dirs['fio']}/{tag}-{workload.name}.json"
    target = mount.file if mount else server.uri
    if config["warmup"]:
        # Unmeasured: on a fresh nbdkit memory export the first writes to each page
        # cost the server an allocation, and FUSE subjects ramp up for seconds.
        warm_output = f"{dirs['fio']}/{tag}-{workload.name}-warmup.json"
        run_fio(fio_argv(workload, config["warmup"], subject, target, warm_output, config["fio_processes"]),
                config["warmup"],
                warm_output, f"{dirs['fio']}/{tag}-{workload.name}-warmup.log")
    argv = fio_argv(workload, config["runtime"], subject, target, output, config["fio_processes"])
    pid = mount.pid if mount else None
    cpu_before = cpu_ticks(pid) if pid else None
    server_before = cpu_ticks(server.child.pid)
    job = run_fio(argv, config["runtime"], output, f"{dirs['fio']}/{tag}-{workload.name}.log")
    result = measure(workload, job)
    result["argv"] = argv
    result["server_cpu_s"] = (cpu_ticks(server.child.pid) - server_before) / CLK_TCK
    if pid:
        cpu = (cpu_ticks(pid) - cpu_before) / CLK_TCK
        result["cpu_s"] = cpu
        result["cpu_us_per_io"] = cpu * 1e6 / result["ios"] if result["ios"] else None
        result["vmhwm_kib"] = vmhwm_kib(pid)
    if result["ios"] == 0:
        raise BenchError("fio did no I/O")
    return result


# ---------------------------------------------------------------- heap allocations per request

# Small requests (the loop thread replies) and large reads (the reply thread and pipes).
ALLOCATION_WORKLOADS = ("qd64", "seqr")


def allocation_sites(report):
    """(calls, module) per allocating site from heaptrack_print's "MOST CALLS TO ALLOCATION
    FUNCTIONS" section: the module is the one whose code called the allocator."""
    sites, calls, in_section = [], None, False
    for line in report.splitlines():
        if line.startswith("MOST CALLS TO ALLOCATION FUNCTIONS"):
            in_section = True
            continue
        if in_section and line and line == line.lstrip() and line.isupper():
            break  # the next section
        if not in_section:
            continue
        m = re.match(r"^(\d+) calls to allocation functions", line)
        if m:
            calls = int(m.group(1))
            continue
        m = re.match(r"^\s+in (\S+)", line)
        if m and calls is not None:
            sites.append((calls, m.group(1)))
            calls = None
    return sites


def module_owner(module):
    name = os.path.basename(module)
    if name.startswith("nbdbridge"):
        return "nbdbridge"
    for library in ("libfuse3", "libnbd", "libc.so", "libstdc++"):
        if name.startswith(library):
            return library.split(".")[0]
    return "other"


def count_allocations(config, dirs, runtime, workload_name):
    """The bridge under heaptrack for one run of the workload: allocator calls per request, by
    the module that called the allocator. Start-up and shutdown are included, so a steady
    state without allocations shows as a small fraction."""
    workload = WORKLOAD_BY_NAME[workload_name]
    run_dir = tempfile.mkdtemp(prefix="alloc.", dir=dirs["work"])
    data = f"{run_dir}/heaptrack"
    argv = {"bridge": ["heaptrack", "-o", data, *config["bridge_argv"]["bridge"]]}
    result = {"workload": workload.name, "runtime_s": runtime}
    with contextlib.ExitStack() as cleanup:
        server = Server(run_dir, dirs["logs"], "alloc", config["tcp"])
        cleanup.callback(server.stop)
        mount = Mount("bridge", argv, server, run_dir, dirs["logs"], "alloc", wrapped=True)
        cleanup.callback(mount.stop)
        output = f"{dirs['fio']}/alloc-{workload.name}.json"
        job = run_fio(fio_argv(workload, runtime, "bridge", mount.file, output, config["fio_processes"]),
                      runtime, output,
                      f"{dirs['fio']}/alloc-{workload.name}.log")
        result["requests"] = measure(workload, job)["ios"]
    files = sorted(Path(run_dir).glob("heaptrack*"))
    if not files:
        raise BenchError(f"heaptrack wrote no data file in {run_dir}")
    report = subprocess.run(["heaptrack_print", "-f", str(files[0]), "-a", "1", "-p", "0", "-T", "0",
                             "-l", "0", "-n", "1000", "-s", "0"],
                            capture_output=True, text=True, timeout=300, check=False).stdout
    by_owner = {}
    for calls, module in allocation_sites(report):
        owner = module_owner(module)
        by_owner[owner] = by_owner.get(owner, 0) + calls
    if not by_owner:
        raise BenchError("heaptrack_print reported no allocation sites")
    result["calls"] = by_owner
    result["per_request"] = {k: v / result["requests"] for k, v in by_owner.items()} if result["requests"] else {}
    shutil.copy2(files[0], dirs["out"] / f"{workload.name}-{files[0].name}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def allocation_lines(allocations):
    lines = []
    for counted in allocations or []:
        per = counted["per_request"]
        owners = sorted(per, key=lambda k: (k != "nbdbridge", -per[k]))
        lines += ["", f"heap allocations per request, nbdbridge under heaptrack, {counted['workload']} "
                      f"{counted['runtime_s']} s, {counted['requests']} requests (start-up and exit included), "
                      "by the module that called the allocator:",
                  "  " + ", ".join(f"{owner} {per[owner]:.3f}" for owner in owners)]
    return lines


# ---------------------------------------------------------------- summary, table, plot

def summarise(runs, subjects, workloads):
    summary = {}
    for subject in subjects:
        per_workload = {}
        for workload in workloads:
            results = [r["workloads"][workload.name] for r in runs
                       if r["subject"] == subject and workload.name in r["workloads"]
                       and r["workloads"][workload.name]["ios"] > 0]
            if not results:
                continue
            values = [x["value"] for x in results]
            cpu = [x["cpu_us_per_io"] for x in results if x.get("cpu_us_per_io") is not None]
            # The server's CPU per I/O moves with the host, not with the subject alone: a round
            # where it jumps for every subject was a slow moment of the machine.
            server = [x["server_cpu_s"] * 1e6 / x["ios"] for x in results if x.get("server_cpu_s") is not None]
            per_workload[workload.name] = {
                "median": statistics.median(values), "min": min(values), "max": max(values),
                "values": values, "unit": workload.unit,
                "cpu_us_per_io_median": statistics.median(cpu) if cpu else None,
                "server_cpu_us_per_io": spread(server)}
        rss_from = RSS_WORKLOAD if RSS_WORKLOAD in [w.name for w in workloads] else workloads[-1].name
        rss = [r["workloads"][rss_from]["vmhwm_kib"] for r in runs
               if r["subject"] == subject and rss_from in r["workloads"]
               and r["workloads"][rss_from].get("vmhwm_kib") is not None]
        summary[subject] = {"workloads": per_workload,
                            "peak_rss_kib_median": statistics.median(rss) if rss else None,
                            "peak_rss_read_after": rss_from}
    return summary


def round_ratios(runs, workload):
    """The same ratios within each round: subjects measured seconds (with --order subjects,
    minutes) apart share the machine's mood of the moment, so a round's ratio drifts less than
    the medians' ratio when the machine's speed moves (it moved 20% between rounds here).
    Returns the bridge over the best peer and over nbd, and each optional subject (a variant of
    the bridge: the A of an A/B) over the bridge, one entry per round that measured both."""
    by_round = {}
    for r in runs:
        cell = r["workloads"].get(workload.name)
        if cell and cell["ios"] > 0:
            by_round.setdefault(r["round"], {})[r["subject"]] = cell["value"]
    over_peer, over_nbd, variants = [], [], {}
    for values in by_round.values():
        bridge = values.get("bridge")
        if not bridge:
            continue
        peers = [values[p] for p in PEERS if values.get(p)]
        if peers:
            over_peer.append(bridge / max(peers))
        if values.get("nbd"):
            over_nbd.append(bridge / values["nbd"])
        for variant in OPTIONAL_SUBJECTS:
            if values.get(variant):
                variants.setdefault(variant, []).append(values[variant] / bridge)
    return over_peer, over_nbd, variants


def spread(values):
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratios(summary, workloads, runs=()):
    out = {}
    for workload in workloads:
        def median(subject):
            return summary.get(subject, {}).get("workloads", {}).get(workload.name, {}).get("median")
        bridge = median("bridge")
        peers = {p: median(p) for p in PEERS if median(p)}
        best = max(peers, key=peers.get) if peers else None
        over_peer, over_nbd, variants = round_ratios(runs, workload)
        out[workload.name] = {
            "best_peer": best,
            "bridge_over_best_peer": bridge / peers[best] if bridge and best else None,
            "bridge_over_nbd": bridge / median("nbd") if bridge and median("nbd") else None,
            "per_round_bridge_over_best_peer": spread(over_peer),
            "per_round_bridge_over_nbd": spread(over_nbd),
            **{f"per_round_{variant}_over_bridge": spread(values) for variant, values in variants.items()}}
    return out


# The targets of issue 4 (this 2-core machine), checked on every run. A missed target is
# reported, not a failure: tools/bench fails only when a subject did not run.
# (workload, what is compared, at least)
TARGETS = (
    ("qd64", "best peer", 2.5),
    ("qd64", "nbd", 0.6),
    ("rd64", "nbd", 0.6),
    ("qd1", "best peer", 1.3),
    ("qd1d", "best peer", 1.3),
    ("seqr", "best peer", 1.2),
    ("seqw", "best peer", 1.2),
)
RSS_TARGET_MIB = 64
# "No heap allocation per request in the steady state": the count includes start-up and exit,
# which over a 5 s run comes to a few hundredths per request.
OUR_ALLOCATIONS_TARGET = 0.2


def check_targets(summary, ratio, allocations=None):
    """Each target the run can judge: the ratio of the medians and the ratios within rounds;
    with --allocations, our heap allocations per request (the libraries' shown beside them)."""
    checked = []
    for workload, against, least in TARGETS:
        r = ratio.get(workload)
        if not r:
            continue
        key = "bridge_over_best_peer" if against == "best peer" else "bridge_over_nbd"
        if r[key] is None:
            continue
        within = r[f"per_round_{key}"]
        checked.append({"target": f"{workload} bridge / {against} >= {least}", "value": r[key],
                        "per_round": within, "met": r[key] >= least,
                        "met_in_every_round": bool(within) and within["min"] >= least})
    rss = summary.get("bridge", {}).get("peak_rss_kib_median")
    if rss:
        checked.append({"target": f"bridge peak RSS <= {RSS_TARGET_MIB} MiB "
                                  f"(after {summary['bridge']['peak_rss_read_after']})",
                        "value": rss / 1024, "per_round": None, "met": rss / 1024 <= RSS_TARGET_MIB,
                        "met_in_every_round": None})
    for counted in allocations or []:
        per = counted["per_request"]
        others = ", ".join(f"{owner} {per[owner]:.2f}" for owner in sorted(per)
                           if owner != "nbdbridge" and per[owner] >= 0.005)
        ours = per.get("nbdbridge", 0.0)
        checked.append({"target": f"{counted['workload']} allocations/request, ours < {OUR_ALLOCATIONS_TARGET}",
                        "value": ours, "per_round": None, "met": ours < OUR_ALLOCATIONS_TARGET,
                        "met_in_every_round": None, "note": f"(others: {others})" if others else ""})
    return checked


def target_lines(checked):
    if not checked:
        return []
    lines = ["", "targets (issue 4): ratio of the medians; within rounds min-max"]
    for t in checked:
        within = t["per_round"]
        spread_text = f"  ({within['min']:.2f}-{within['max']:.2f})" if within else ""
        verdict = "met" if t["met"] else "MISSED"
        if t["met"] and t["met_in_every_round"] is False:
            verdict += ", not in every round"
        note = f"  {t['note']}" if t.get("note") else ""
        lines.append(f"  {t['target']:<40} {t['value']:>7.2f}{spread_text:<14} {verdict}{note}")
    return lines


def table(config, summary, ratio):
    subjects, workloads = config["subjects"], config["workloads"]
    width = max(10, max(len(s) for s in subjects) + 2)  # one column per subject
    rows = []
    rounds = config["rounds"]
    warmup = f" (after {config['warmup']} s unmeasured)" if config["warmup"] else ""
    warmup += (", export written once before each mount" if config["prefill"]
               else ", exports never written before")
    if config.get("separate_sessions"):
        warmup += ", server and subjects in sessions of their own"
    if config.get("fio_processes"):
        warmup += ", fio jobs as processes"
    if config.get("tcp"):
        warmup += ", exports over TCP on 127.0.0.1"
    if config.get("order") == "subjects":
        warmup += ", each subject's workloads in one go"
    rows.append(f"median of {rounds} round{'s' * (rounds > 1)} x {config['runtime']} s per workload{warmup}; "
                "4k workloads in IOPS (read+write), 1M workloads in MiB/s")
    header = f"{'workload':<8} {'unit':<6}" + "".join(f"{s:>{width}}" for s in subjects)
    show_peer = "bridge" in subjects and any(p in subjects for p in PEERS)
    show_nbd = "bridge" in subjects and "nbd" in subjects
    header += (f"{'bridge/peer':>19}" if show_peer else "") + (f"{'bridge/nbd':>12}" if show_nbd else "")
    rows.append(header)
    for w in workloads:
        line = f"{w.name:<8} {w.unit:<6}"
        for s in subjects:
            cell = summary[s]["workloads"].get(w.name)
            line += f"{cell['median']:>{width}.0f}" if cell else f"{'-':>{width}}"
        r = ratio[w.name]
        if show_peer:
            peer = f"{r['bridge_over_best_peer']:.2f} ({r['best_peer']})" if r["best_peer"] and \
                r["bridge_over_best_peer"] else "-"
            line += f"{peer:>19}"
        if show_nbd:
            line += f"{r['bridge_over_nbd']:>12.2f}" if r["bridge_over_nbd"] else f"{'-':>12}"
        rows.append(line)
    fuse_subjects = [s for s in subjects if s in FUSE_SUBJECTS]
    if fuse_subjects:
        rows.append("")
        rows.append("CPU time of the FUSE process per I/O, microseconds (median); nbd: n/a")
        rows.append(f"{'workload':<15}" + "".join(f"{s:>{width}}" for s in subjects))
        for w in workloads:
            line = f"{w.name:<15}"
            for s in subjects:
                cell = summary[s]["workloads"].get(w.name)
                if s not in FUSE_SUBJECTS:
                    line += f"{'n/a':>{width}}"
                else:
                    cpu = cell and cell["cpu_us_per_io_median"]
                    line += f"{cpu:>{width}.1f}" if cpu is not None else f"{'-':>{width}}"
            rows.append(line)
        rss_line = f"{'peak RSS MiB':<15}"
        for s in subjects:
            rss = summary[s]["peak_rss_kib_median"]
            rss_line += f"{rss / 1024:>{width}.1f}" if rss else f"{'n/a' if s == 'nbd' else '-':>{width}}"
        after = summary[fuse_subjects[0]]["peak_rss_read_after"]
        rows.append(rss_line + f"   (VmHWM after {after})")
    rows += server_cpu_rows(config, summary)
    rows += round_ratio_rows(config, ratio, show_peer, show_nbd)
    return "\n".join(rows)


def cpu_digits(microseconds):
    return f"{microseconds:.0f}" if microseconds >= 100 else f"{microseconds:.1f}"


def server_cpu_rows(config, summary):
    subjects = config["subjects"]
    width = max(22, max(len(s) for s in subjects) + 2)
    rows = ["", "CPU time of the server (nbdkit) per I/O, microseconds: median (min-max over rounds)",
            f"{'workload':<15}" + "".join(f"{s:>{width}}" for s in subjects)]
    for w in config["workloads"]:
        line = f"{w.name:<15}"
        for s in subjects:
            cell = summary[s]["workloads"].get(w.name)
            d = cell and cell.get("server_cpu_us_per_io")
            text = (f"{cpu_digits(d['median'])} ({cpu_digits(d['min'])}-{cpu_digits(d['max'])})"
                    if d else "-")
            line += f"{text:>{width}}"
        rows.append(line)
    return rows


def round_ratio_rows(config, ratio, show_peer, show_nbd):
    columns = [("per_round_bridge_over_best_peer", "bridge/best peer")] if show_peer else []
    columns += [("per_round_bridge_over_nbd", "bridge/nbd")] if show_nbd else []
    if "bridge" in config["subjects"]:
        columns += [(f"per_round_{variant}_over_bridge", f"{variant}/bridge")
                    for variant in OPTIONAL_SUBJECTS if variant in config["subjects"]]
    if config["rounds"] < 2 or not columns:
        return []
    apart = "minutes" if config.get("order") == "subjects" else "seconds"
    width = max(22, max(len(title) for _, title in columns) + 2)
    rows = ["", f"ratios within each round (the subjects compared ran {apart} apart): median (min-max)",
            f"{'workload':<15}" + "".join(f"{title:>{width}}" for _, title in columns)]
    for w in config["workloads"]:
        cells = []
        for key, _ in columns:
            d = ratio[w.name].get(key)
            cells.append(f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f})" if d else "-")
        rows.append(f"{w.name:<15}" + "".join(f"{c:>{width}}" for c in cells))
    return rows


COLOURS = {"bridge": "#d62728", "nbdfuse": "#1f77b4", "qsd": "#2ca02c", "nbd": "#7f7f7f",
           "bridge-nostats": "#ff9896", "bridge-threads": "#9467bd", "bridge-other": "#8c564b"}


def plot(config, summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subjects, workloads = config["subjects"], config["workloads"]
    panels = [(unit, [w for w in workloads if w.unit == unit]) for unit in ("IOPS", "MiB/s")]
    panels = [(unit, ws) for unit, ws in panels if ws]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 + 1.6 * len(workloads), 5.5), squeeze=False,
                             gridspec_kw={"width_ratios": [len(ws) for _, ws in panels]})
    width = 0.8 / len(subjects)
    for ax, (unit, ws) in zip(axes[0], panels):
        lows = [c["min"] for s in subjects for w in ws if (c := summary[s]["workloads"].get(w.name))]
        floor = 10 ** math.floor(math.log10(min(lows, default=1) * 0.9))
        for i, subject in enumerate(subjects):
            cells = [summary[subject]["workloads"].get(w.name) for w in ws]
            xs = [j + (i - (len(subjects) - 1) / 2) * width for j in range(len(ws))]
            heights = [c["median"] if c else 0 for c in cells]
            low = [c["median"] - c["min"] if c else 0 for c in cells]
            high = [c["max"] - c["median"] if c else 0 for c in cells]
            ax.bar(xs, heights, width, label=subject, color=COLOURS.get(subject),
                   yerr=[low, high], capsize=2, error_kw={"elinewidth": 0.8})
            for x, cell in zip(xs, cells):
                if cell:  # the median, just above the error bar
                    ax.text(x, cell["max"] * 1.06, format_value(cell["median"]), rotation=90,
                            ha="center", va="bottom", fontsize=8)
                else:
                    ax.text(x, floor * 1.1, "no result", rotation=90, ha="center", va="bottom",
                            fontsize=8, color=COLOURS.get(subject))
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        ax.set_xticks(range(len(ws)), [f"{w.name}\n{w.bs} d{w.iodepth}" +
                                       ("" if w.direct else " buf") for w in ws])
        ax.set_ylabel(f"{unit} (log scale)")
        ax.set_title("4 KiB random I/O" if unit == "IOPS" else "1 MiB sequential I/O")
        ax.grid(axis="y", which="both", alpha=0.3)
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, top * 3)  # room for the labels
    axes[0][0].legend(loc="upper left", fontsize=9)
    rounds = config["rounds"]
    fig.suptitle(f"nbdbridge vs peers on nbdkit memory: median of {rounds} round"
                 f"{'s' * (rounds > 1)} x {config['runtime']} s (bars: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_value(v):
    return f"{v / 1000:.1f}k" if v >= 10000 else f"{v:.0f}"


# ---------------------------------------------------------------- main

def parse_args():
    global EXPORT_SIZE, EXPORT_BYTES  # --export-mib
    p = argparse.ArgumentParser(
        prog="tools/bench",
        description="Benchmark nbdbridge against its peers with fio. Every subject gets a fresh "
                    f"`nbdkit memory {EXPORT_SIZE}` on a private unix socket (with --tcp: on "
                    "127.0.0.1) in every round, written once before the subject mounts it (see "
                    "--never-written); within a round the subjects take turns per "
                    "workload, and the order of the subjects rotates from round to round.",
        epilog="subjects: bridge (build/nbdbridge, extra arguments from $BRIDGE_ARGS), nbdfuse "
               "(libnbd-bin), qsd (qemu-storage-daemon FUSE export over its nbd driver), nbd "
               "(fio's nbd engine straight to the server: the no-FUSE ceiling); optional: "
               "bridge-threads (the same binary with --connection-threads all), bridge-nostats, "
               "bridge-other (the binary given by --bridge-other, with $BRIDGE_ARGS too). "
               "workloads: "
               + "; ".join(f"{w.name} = {w.description}" for w in WORKLOADS)
               + ". Exits non-zero if any subject failed to run or did no I/O.")
    p.add_argument("--rounds", type=int, help="rounds (default 3)")
    p.add_argument("--runtime", type=int, help="seconds per workload (default 5)")
    p.add_argument("--order", choices=("workloads", "subjects"), default="workloads",
                   help="workloads (default): within a round, every subject is mounted at once and "
                        "they take turns per workload, so the subjects compared ran seconds apart; "
                        "subjects: each subject runs all its workloads before the next one mounts")
    p.add_argument("--separate-sessions", action="store_true",
                   help="start the server and each subject in a session of its own (with scheduler "
                        "autogroups: a CPU share each) instead of in the bench's session")
    p.add_argument("--fio-processes", action="store_true",
                   help="run fio's job as a process, as shared/bench/compare.sh does, instead of a "
                        "thread (fio then puts it in a session, hence a scheduler autogroup, of its own)")
    p.add_argument("--tcp", action="store_true",
                   help="serve every export on a free TCP port of 127.0.0.1 (nbd://127.0.0.1:PORT) "
                        "instead of a private unix socket")
    p.add_argument("--never-written", dest="prefill", action="store_false",
                   help="measure on exports never written before (the server allocates each page at "
                        "its first write, which can halve even fio's own nbd engine); by default each "
                        "export is written once (fio nbd engine, 1 MiB) before its subject mounts it")
    p.add_argument("--prefill", dest="prefill", action="store_true", default=True,
                   help=argparse.SUPPRESS)  # the default since session 11; kept for old command lines
    p.add_argument("--warmup", type=int, default=0,
                   help="seconds of the same workload run unmeasured before each measured run "
                        "(default 0: measure from a fresh export)")
    p.add_argument("--subjects", default=",".join(SUBJECTS), help="comma-separated (default: all)")
    p.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS if w.name not in OPTIONAL_WORKLOADS),
                   help="comma-separated (default: all but %s)" % ", ".join(OPTIONAL_WORKLOADS))
    p.add_argument("--out", help="output directory (default bench-results/<timestamp>)")
    p.add_argument("--quick", action="store_true", help="1 round of 2 s per workload (smoke test)")
    p.add_argument("--allocations", action="store_true",
                   help="also run the bridge under heaptrack (depth-64 mixed, then 1 MiB reads) and "
                        "report heap allocations per request by the module that made them")
    p.add_argument("--bridge", default="build/nbdbridge", help="the nbdbridge binary")
    p.add_argument("--bridge-nostats", default="build-nostats/nbdbridge",
                   help="nbdbridge built without statistics (subject bridge-nostats)")
    p.add_argument("--bridge-other",
                   help="another nbdbridge binary (subject bridge-other), e.g. an older commit's build, "
                        "to compare with bridge in one run; run it twice with the two binaries swapped, "
                        "since a subject's place in the round moves its numbers")
    p.add_argument("--export-mib", type=int, default=1024,
                   help="size of the nbdkit memory export in MiB (default 1024; tests use less, since "
                        "--tcp writes it whole once per subject)")
    args = p.parse_args()
    if not 64 <= args.export_mib <= 1 << 20:
        p.error("--export-mib must be 64 to 1048576")
    EXPORT_SIZE, EXPORT_BYTES = f"{args.export_mib}M", args.export_mib << 20
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.runtime = args.runtime or (2 if args.quick else 5)
    if args.rounds < 1 or args.runtime < 1:
        p.error("--rounds and --runtime must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must not be negative")
    if args.separate_sessions:
        Child.grouping = {"start_new_session": True}
    args.subjects = pick(p, "subject", args.subjects, SUBJECTS + OPTIONAL_SUBJECTS)
    args.workloads = [WORKLOAD_BY_NAME[n] for n in pick(p, "workload", args.workloads,
                                                         WORKLOAD_BY_NAME)]
    return args


def pick(parser, kind, text, known):
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"unknown {kind}(s) {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(known)}")
    return names


def check_tools(args):
    problems = []
    needed = {"nbdkit", "fio", "timeout", "umount"}
    if args.allocations:
        needed |= {"heaptrack", "heaptrack_print", "fusermount3"}
    if "nbdfuse" in args.subjects:
        needed |= {"nbdfuse", "fusermount3"}
    if "bridge" in args.subjects:
        needed.add("fusermount3")
    if "qsd" in args.subjects:
        needed.add("qemu-storage-daemon")
    problems += [f"{tool} is not installed" for tool in sorted(needed) if not shutil.which(tool)]
    if "bridge" in args.subjects and not os.access(args.bridge, os.X_OK):
        problems.append(f"nbdbridge binary {args.bridge} is missing (build it first)")
    if "bridge-other" in args.subjects and not (args.bridge_other and os.access(args.bridge_other, os.X_OK)):
        problems.append("subject bridge-other needs --bridge-other BINARY (an executable nbdbridge)")
    if set(args.subjects) & set(FUSE_SUBJECTS) and not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
    if "nbd" in args.subjects and shutil.which("fio"):
        engine = subprocess.run(["fio", "--enghelp=nbd"], capture_output=True, text=True,
                                timeout=30, check=False)
        if engine.returncode != 0 or "uri" not in engine.stdout:
            problems.append("this fio has no nbd engine (fio --enghelp=nbd failed)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        problems.append(f"{sys.executable} cannot import matplotlib (apt-get install python3-matplotlib)")
    return problems


def versions(args):
    def first_line(argv):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            return (done.stdout or done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None
    found = {"fio": first_line(["fio", "--version"]), "nbdkit": first_line(["nbdkit", "--version"]),
             "kernel": os.uname().release}
    if "nbdfuse" in args.subjects:
        found["nbdfuse"] = first_line(["nbdfuse", "--version"])
    if "qsd" in args.subjects:
        found["qsd"] = first_line(["qemu-storage-daemon", "--version"])
    if "bridge" in args.subjects:
        repo = Path(args.bridge).resolve().parent.parent
        found["repo_head_at_start"] = first_line(["git", "-C", str(repo), "rev-parse", "HEAD"])
    return found


def on_signal(signum, _frame):
    if getattr(on_signal, "seen", False):
        log("cleaning up, please wait")
        return
    on_signal.seen = True
    raise Interrupted(signal.Signals(signum).name)


def main():
    args = parse_args()
    problems = check_tools(args)
    if problems:
        for problem in problems:
            log(f"error: {problem}")
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"bench-results/{stamp}").resolve()
    dirs = {"out": out, "fio": out / "fio", "logs": out / "logs"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix="nbdbridge-bench.")  # short paths for the unix sockets
    dirs["work"] = work

    config = {"rounds": args.rounds, "runtime": args.runtime, "order": args.order, "warmup": args.warmup,
              "prefill": args.prefill, "separate_sessions": args.separate_sessions,
              "fio_processes": args.fio_processes, "tcp": args.tcp,
              "subjects": args.subjects, "workloads": args.workloads}
    meta = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
            "rounds": args.rounds, "runtime_s": args.runtime, "warmup_s": args.warmup,
            "order": args.order,
            "prefilled": args.prefill, "separate_sessions": args.separate_sessions,
            "fio_processes": args.fio_processes,
            "subjects": args.subjects,
            "workloads": {w.name: {"description": w.description, "unit": w.unit}
                          for w in args.workloads},
            "export": f"nbdkit memory {EXPORT_SIZE}", "clk_tck": CLK_TCK,
            "transport": "tcp 127.0.0.1" if args.tcp else "unix socket",
            "versions": versions(args)}
    if {"bridge", "bridge-threads"} & set(args.subjects) or args.allocations:
        # A private copy, so a rebuild of build/ during the run cannot mix two binaries.
        bridge_copy = f"{work}/nbdbridge"
        shutil.copy2(args.bridge, bridge_copy)
        bridge_args = shlex.split(os.environ.get("BRIDGE_ARGS", ""))
        config["bridge_argv"] = {"bridge": [bridge_copy, *bridge_args],
                                 "bridge-threads": [bridge_copy, "--connection-threads", "all", *bridge_args]}
        meta["bridge"] = {"binary": str(Path(args.bridge).resolve()), "args": bridge_args,
                          "sha256": hashlib.sha256(Path(bridge_copy).read_bytes()).hexdigest()}

    for subject, binary in (("bridge-nostats", args.bridge_nostats), ("bridge-other", args.bridge_other)):
        if subject not in args.subjects:
            continue
        copy = f"{work}/nbdbridge-{subject}"
        shutil.copy2(binary, copy)
        config.setdefault("bridge_argv", {})[subject] = [copy, *shlex.split(os.environ.get("BRIDGE_ARGS", ""))]
        meta[subject] = {"binary": str(Path(binary).resolve()),
                         "sha256": hashlib.sha256(Path(copy).read_bytes()).hexdigest()}

    log(f"tools/bench: {args.rounds} round(s) x {len(args.workloads)} workload(s) x "
        f"{args.runtime} s, subjects {', '.join(args.subjects)}; results in {out}")
    runs, interrupted, allocations = [], None, None
    allocation_failure = None
    try:
        for round_no in range(1, args.rounds + 1):
            shift = (round_no - 1) % len(args.subjects)
            order = args.subjects[shift:] + args.subjects[:shift]
            log(f"round {round_no}/{args.rounds}: {' '.join(order)}")
            run_round(round_no, order, config, dirs, runs)
        # After the rounds: heaptrack's slow start and its data file would disturb the
        # first subject measured after it (seen: round 1 of the bridge 10-25% low).
        if args.allocations:
            allocations = []
            for workload_name in ALLOCATION_WORKLOADS:
                log(f"allocations: nbdbridge under heaptrack, {workload_name} for {args.runtime} s")
                try:
                    allocations.append(count_allocations(config, dirs, args.runtime, workload_name))
                    for line in allocation_lines(allocations[-1:])[1:]:
                        log(line)
                except BenchError as e:
                    allocation_failure = f"allocations ({workload_name}): {e}"
                    log(f"  {allocation_failure}")
    except Interrupted as e:
        interrupted = str(e)
        log(f"interrupted by {interrupted}: cleaning up")
    finally:
        for mountpoint in mounts_under(work):
            log(f"warning: {mountpoint} was still mounted: unmounting by force")
            force_unmount(mountpoint)
        for child in Child.started:
            if child.alive():
                log(f"warning: {child.name} (pid {child.pid}) was still running: stopping it")
                child.stop()
        if not mounts_under(work):
            shutil.rmtree(work, ignore_errors=True)
    meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")

    summary = summarise(runs, args.subjects, args.workloads)
    ratio = ratios(summary, args.workloads, runs)
    failures = [f"round {r['round']} {r['subject']}: {error}" for r in runs for error in r["errors"]]
    if allocation_failure:
        failures.append(allocation_failure)
    if interrupted:
        failures.insert(0, f"interrupted by {interrupted}")
    else:
        failures += [f"{s}: no workload ran through it" for s in args.subjects
                     if not summary[s]["workloads"]]

    targets = check_targets(summary, ratio, allocations)
    results = {"meta": meta, "runs": runs, "summary": summary, "ratios": ratio,
               "targets": targets, "allocations": allocations, "failures": failures}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(config, summary, ratio) + "".join(
        "\n" + line for line in allocation_lines(allocations) + target_lines(targets))
    (out / "summary.txt").write_text(text + "\n" + "".join(f"FAILED: {f}\n" for f in failures))
    print(text, flush=True)
    if any(summary[s]["workloads"] for s in args.subjects):
        plot(config, summary, out / "plot.png")
        log(f"wrote {out}/results.json, summary.txt, plot.png")
    if failures:
        log("")
        for failure in failures:
            log(f"FAILED: {failure}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
