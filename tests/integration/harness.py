"""Shared helpers for the nbdbridge integration tests.

Python 3 standard library only.  Every wait in here has a deadline; nothing
is allowed to block forever.  Polling with a short interval until a condition
holds (or a deadline passes) is the only kind of sleeping used.

Main pieces:
  * tmpdir()            private temporary directory (removed at the end)
  * Nbdkit              context manager running `nbdkit -f -U SOCK ...`
  * Mount               context manager running nbdbridge until unmounted
  * pattern_bytes()     expected content of the nbdkit pattern plugin
  * fuse_mounts()       parsed /proc/self/mountinfo (FUSE entries only)
  * main()              tiny test runner printing "N passed, M failed"
"""

import atexit
import errno
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

DEADLINE = 20.0          # default deadline for any wait, in seconds
POLL = 0.01              # polling interval while waiting for a condition
FILE_TIMEOUT = float(os.environ.get("NBDBRIDGE_TEST_FILE_TIMEOUT", "170"))

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
NBDBRIDGE = os.environ.get("NBDBRIDGE") or os.path.join(REPO, "build", "nbdbridge")
SYS_PYTHON = "/usr/bin/python3"   # usable by unprivileged users too

# Everything the tests create lives below BASE.
BASE = os.path.realpath(tempfile.mkdtemp(prefix="nbdbridge-it-"))

_live_procs = []         # every Popen started through this module
_lock = threading.Lock()


class SkipTest(Exception):
    pass


class TestFailure(AssertionError):
    pass


# ---------------------------------------------------------------------------
# generic helpers

def log(*args):
    print(*args, flush=True)


def wait_until(cond, timeout=DEADLINE, what="condition", interval=POLL):
    """Poll cond() until it returns a truthy value or the deadline passes."""
    end = time.monotonic() + timeout
    while True:
        r = cond()
        if r:
            return r
        if time.monotonic() >= end:
            raise TestFailure("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def read_text(path):
    """The file's text, or "" if it cannot be read (a log not written yet)."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def tmpdir(prefix="t"):
    return tempfile.mkdtemp(prefix=prefix + "-", dir=BASE)


# A report of the sanitizer build (tools/test's second pass). Its exit status alone
# would pass unseen in the tests that expect nbdbridge to fail.
_SANITIZER_REPORT = re.compile(r"ERROR: (?:Address|Leak|Thread)Sanitizer|runtime error: |"
                               r"UndefinedBehaviorSanitizer|Sanitizer has encountered a fatal error")


def check_no_sanitizer_report(stderr, what):
    if stderr and _SANITIZER_REPORT.search(stderr):
        raise TestFailure("sanitizer report from %s:\n%s" % (what, stderr[-6000:]))


def run(cmd, timeout=DEADLINE, check=False, input=None, **kw):
    """Run cmd to completion with a mandatory timeout; output captured as
    text.  On timeout the command is killed, but we never wait for it without
    a bound (a process stuck on a dead FUSE mount may need the mount to be
    aborted first; the end-of-test cleanup takes care of it)."""
    kw.setdefault("stdin", subprocess.PIPE if input is not None else subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    p = subprocess.Popen(cmd, **kw)
    try:
        out, err = p.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        try:
            p.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            _track(p)        # still stuck: reaped by the cleanup later
        raise TestFailure("command timed out after %ss: %r" % (timeout, cmd))
    r = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if isinstance(err, str):
        check_no_sanitizer_report(err, cmd)
    if check and r.returncode != 0:
        raise TestFailure("command failed (%d): %r\nstdout: %s\nstderr: %s"
                          % (r.returncode, cmd, r.stdout, r.stderr))
    return r


def _track(p):
    with _lock:
        _live_procs.append(p)
    return p


def readline_within(stream, timeout, what):
    """One line from a child's pipe, waiting at most timeout seconds ("" at EOF).
    Reads the file descriptor a byte at a time, never past the newline: a buffered
    readline() could take in the next line too, which a later select() (or
    communicate()) then never sees."""
    import select
    fd = stream.fileno()
    line = b""
    end = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TestFailure("%s: no line within %s s (so far %r)" % (what, timeout, line))
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return line.decode(errors="replace")


def popen(cmd, **kw):
    kw.setdefault("stdin", subprocess.DEVNULL)
    return _track(subprocess.Popen(cmd, **kw))


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def check_eq(got, expected, msg=""):
    if got != expected:
        raise TestFailure("%s: expected %r, got %r" % (msg or "mismatch", expected, got))


def errno_name(e):
    return errno.errorcode.get(e, str(e)) if e else "OK"


def os_errno(fn, *args):
    """Call fn(*args); return (0, result) or (errno, None)."""
    try:
        return 0, fn(*args)
    except OSError as e:
        return e.errno, None


def first_diff(a, b):
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n if len(a) != len(b) else -1


def check_bytes(got, expected, what="data"):
    if got != expected:
        i = first_diff(got, expected)
        raise TestFailure("%s differs: len got=%d expected=%d, first difference at +%d "
                          "(got %r, expected %r)" % (what, len(got), len(expected), i,
                                                     got[i:i + 16], expected[i:i + 16]))


def pread_full(fd, length, offset):
    """pread until length bytes or EOF (direct I/O may return short reads)."""
    out = []
    got = 0
    while got < length:
        b = os.pread(fd, length - got, offset + got)
        if not b:
            break
        out.append(b)
        got += len(b)
    return b"".join(out)


def pwrite_full(fd, data, offset):
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:
            raise TestFailure("pwrite returned %d" % n)
        done += n
    return done


# ---------------------------------------------------------------------------
# nbdkit pattern plugin

def pattern_bytes(offset, length, size=None):
    """Bytes served by `nbdkit pattern SIZE` at [offset, offset+length).

    Each aligned 8-byte big-endian word holds its own byte offset.  When
    size is given the result is cut at EOF like a read would be.
    """
    if size is not None:
        length = max(0, min(length, size - offset))
    if length <= 0:
        return b""
    start = offset - offset % 8
    end = offset + length
    endw = (end + 7) // 8 * 8
    n = (endw - start) // 8
    buf = struct.pack(">%dQ" % n, *range(start, endw, 8))
    return buf[offset - start: offset - start + length]


def write_pattern_file(path, size):
    with open(path, "wb") as f:
        chunk = 1 << 20
        off = 0
        while off < size:
            n = min(chunk, size - off)
            f.write(pattern_bytes(off, n))
            off += n


# ---------------------------------------------------------------------------
# mounts

def _unescape(s):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def fuse_mounts():
    """List of dicts for FUSE mounts in /proc/self/mountinfo."""
    res = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            try:
                sep = parts.index("-")
            except ValueError:
                continue
            fstype = parts[sep + 1]
            if not (fstype == "fuse" or fstype.startswith("fuse.") or fstype == "fuseblk"):
                continue
            res.append({
                "id": parts[0],
                "dev": parts[2],
                "mountpoint": _unescape(parts[4]),
                "mount_opts": parts[5],
                "fstype": fstype,
                "source": _unescape(parts[sep + 2]),
                "super_opts": parts[sep + 3] if len(parts) > sep + 3 else "",
            })
    return res


def mount_entry(path):
    """FUSE mount entry whose mount point is exactly path (no stat calls:
    path must already be canonical, as everything below BASE is)."""
    path = path.rstrip("/") or "/"
    for m in fuse_mounts():
        if m["mountpoint"] == path:
            return m
    return None


def is_mounted(path):
    return mount_entry(path) is not None


def mounts_under(prefix=BASE):
    prefix = prefix.rstrip("/") + "/"
    return [m for m in fuse_mounts() if (m["mountpoint"] + "/").startswith(prefix)]


def force_unmount(path):
    """Best effort: fusermount3 -u, then umount -l.  Never blocks for long."""
    for cmd in (["fusermount3", "-u", path], ["umount", "-l", path]):
        try:
            run(cmd, timeout=10)
        except TestFailure:
            pass
        if not is_mounted(path):
            return True
    return not is_mounted(path)


# ---------------------------------------------------------------------------
# processes

def proc_state(pid):
    """Single-letter state from /proc/PID/stat, or None if gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return s[s.rindex(")") + 2]


def pid_alive(pid):
    st = proc_state(pid)
    return st is not None and st not in ("Z", "X")


def proc_ppid(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
    except OSError:
        return None
    return int(s[s.rindex(")") + 2:].split()[1])


def proc_cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def proc_environ(pid):
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            items = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return {}
    return dict(i.split("=", 1) for i in items if "=" in i)


def descendants(pid):
    """All live descendant pids of pid."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            pp = proc_ppid(int(d))
            if pp is not None:
                children.setdefault(pp, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            if pid_alive(c):
                out.append(c)
            todo.append(c)
    return out


def free_tcp_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _can_connect_unix(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _can_connect_tcp(host, port):
    try:
        s = socket.create_connection((host, port), timeout=1)
    except OSError:
        return False
    s.close()
    return True


class Nbdkit:
    """`nbdkit -f -U SOCK [opts] PLUGIN ARGS...`; waits for the socket.

    opts go before the plugin name (e.g. ["-r", "--filter=log"]).  With
    tcp=True the server listens on 127.0.0.1:self.port instead.
    """

    def __init__(self, args, opts=(), tcp=False, socket_mode=None, d=None):
        self.d = d or tmpdir("nbdkit")
        self.args = list(args)
        self.opts = list(opts)
        self.tcp = tcp
        self.socket_mode = socket_mode
        self.sock = os.path.join(self.d, "nbd.sock")
        self.port = None
        self.errpath = os.path.join(self.d, "nbdkit.stderr")
        self.proc = None

    @property
    def uri(self):
        if self.tcp:
            return "nbd://127.0.0.1:%d/" % self.port
        return "nbd+unix:///?socket=%s" % self.sock

    def uri_export(self, name):
        if self.tcp:
            return "nbd://127.0.0.1:%d/%s" % (self.port, name)
        return "nbd+unix:///%s?socket=%s" % (name, self.sock)

    def start(self):
        for attempt in range(3):
            if self.tcp:
                self.port = free_tcp_port()
                where = ["-i", "127.0.0.1", "-p", str(self.port)]
            else:
                where = ["-U", self.sock]
            cmd = ["nbdkit", "-f", "--exit-with-parent"] + where + self.opts + self.args
            err = open(self.errpath, "ab")
            self.proc = popen(cmd, stdout=err, stderr=err)
            err.close()
            try:
                if self.tcp:
                    wait_until(lambda: self.proc.poll() is not None
                               or _can_connect_tcp("127.0.0.1", self.port),
                               what="nbdkit tcp listen")
                else:
                    wait_until(lambda: self.proc.poll() is not None
                               or _can_connect_unix(self.sock),
                               what="nbdkit socket %s" % self.sock)
            except BaseException:
                self.stop()
                raise
            if self.proc.poll() is None:
                if self.socket_mode is not None and not self.tcp:
                    os.chmod(self.sock, self.socket_mode)
                return self
            if not self.tcp:
                break          # a unix socket failure is not a port race
        raise TestFailure("nbdkit failed to start: %r\n%s" % (cmd, self.stderr()))

    def stderr(self):
        return read_text(self.errpath)

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    # (not raised: it would hide the error that is ending the test; the
                    # process stays tracked, so the end-of-test check reports it)
                    log("nbdkit pid %d survived SIGKILL for 10 s" % self.proc.pid)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


class Proxy:
    """Unix-socket TCP-style forwarder in front of an NBD server.

    Lets a test make "the server" close the connection in an orderly way
    (close_all) without the real server going away.
    """

    def __init__(self, upstream_sock, d=None):
        self.upstream = upstream_sock
        self.d = d or tmpdir("proxy")
        self.sock = os.path.join(self.d, "proxy.sock")
        self.uri = "nbd+unix:///?socket=%s" % self.sock
        self.conns = []
        self.nconn = 0
        self._stop = False
        self._lsock = None
        self._lock = threading.Lock()

    def start(self):
        self._lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._lsock.bind(self.sock)
        self._lsock.listen(16)
        self._lsock.settimeout(0.2)
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def _accept_loop(self):
        while not self._stop:
            try:
                c, _ = self._lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                u.connect(self.upstream)
            except OSError:
                c.close()
                u.close()
                continue
            self._serve(c, u)

    def _serve(self, c, u):
        """Forwards one accepted client c to its upstream connection u;
        subclasses override it to interfere with the stream."""
        with self._lock:
            self.conns.append((c, u))
            self.nconn += 1
        for a, b in ((c, u), (u, c)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for x in (src, dst):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close_one(self, index):
        """Close the index-th client connection accepted (orderly FIN from 'the
        server'); the others stay up."""
        with self._lock:
            c, u = self.conns[index]
        for x in (c, u):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close_all(self):
        """Close every client connection (orderly FIN from 'the server')."""
        with self._lock:
            conns, self.conns = self.conns, []
        for c, u in conns:
            for x in (c, u):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                x.close()

    def stop(self):
        self._stop = True
        self.close_all()
        if self._lsock:
            self._lsock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


class StallingProxy(Proxy):
    """Forwards the first connection to the server; later ones are accepted and held
    without a word, as by a server that stopped answering."""

    def _serve(self, c, u):
        if self.nconn == 0:
            return super()._serve(c, u)
        with self._lock:
            self.conns.append((c, u))
            self.nconn += 1


class MountFailed(TestFailure):
    def __init__(self, msg, returncode=None, stderr=""):
        super().__init__(msg)
        self.returncode = returncode
        self.stderr = stderr


class Mount:
    """Run nbdbridge [opts] MOUNTPOINT TARGET... until unmounted.

    target: list of argv words (e.g. [uri] or ["--unix", path] or
    ["[", "nbdkit", "memory", "1M", "]"]).
    On exit (also when the body raised) the mount is removed with
    `fusermount3 -u` (fallback: SIGKILL + `umount -l`), the process is waited
    for with a deadline, and the exit status is checked against expect_exit
    (None = don't check).
    """

    def __init__(self, mountpoint, target, opts=(), user=None, pass_fds=(),
                 expect_exit=0, timeout=DEADLINE, env=None, binary=None,
                 wait_pidfile=None, after_start=None):
        self.after_start = after_start
        self.mountpoint = mountpoint
        self.target = list(target)
        self.opts = list(opts)
        self.user = user
        self.pass_fds = tuple(pass_fds)
        self.expect_exit = expect_exit
        self.timeout = timeout
        self.env = env
        self.binary = binary or NBDBRIDGE
        self.wait_pidfile = wait_pidfile
        self.proc = None
        self.returncode = None
        self.d = tmpdir("mount")
        self.errpath = os.path.join(self.d, "nbdbridge.stderr")
        self.outpath = os.path.join(self.d, "nbdbridge.stdout")
        # Which path is mounted on, and where the export shows up.
        mp = mountpoint
        if os.path.isdir(mp):
            self.mountdir = os.path.realpath(mp)
            self.export = os.path.join(self.mountdir, "nbd")
        elif os.path.isfile(mp):
            self.mountdir = os.path.realpath(mp)
            self.export = self.mountdir
        else:
            self.mountdir = os.path.realpath(os.path.dirname(mp) or ".")
            self.export = os.path.join(self.mountdir, os.path.basename(mp))

    @property
    def cmd(self):
        base = [self.binary] + self.opts + [self.mountpoint] + self.target
        if self.user:
            return ["runuser", "-u", self.user, "--"] + base
        return base

    def stderr(self):
        return read_text(self.errpath)

    @property
    def pid(self):
        return self.proc.pid

    def mounted(self):
        return is_mounted(self.mountdir)

    def start(self):
        if not os.path.exists(self.binary):
            raise TestFailure("nbdbridge binary not found: %s (set NBDBRIDGE)" % self.binary)
        out = open(self.outpath, "wb")
        err = open(self.errpath, "wb")
        if self.user:
            os.chmod(self.d, 0o755)
        try:
            self.proc = popen(self.cmd, stdout=out, stderr=err, pass_fds=self.pass_fds,
                              env=self.env, start_new_session=True)
        finally:
            out.close()
            err.close()
            if self.after_start:
                self.after_start()    # e.g. close our copy of a passed fd
        return self

    def wait_mounted(self):
        def ready():
            if self.proc.poll() is not None:
                return True
            if self.wait_pidfile:
                return os.path.exists(self.wait_pidfile) and self.mounted()
            return self.mounted()
        try:
            wait_until(ready, timeout=self.timeout, what="mount on %s" % self.mountdir)
        except TestFailure:
            self.cleanup()
            raise TestFailure("nbdbridge did not mount %s within %ss: %r\nstderr: %s"
                              % (self.mountdir, self.timeout, self.cmd, self.stderr()))
        if not self.mounted():
            rc = self.proc.wait(timeout=self.timeout)
            self.returncode = rc
            check_no_sanitizer_report(self.stderr(), self.cmd)
            raise MountFailed("nbdbridge exited with %s before mounting: %r\nstderr: %s"
                              % (rc, self.cmd, self.stderr()), rc, self.stderr())
        return self

    def __enter__(self):
        if self.proc is None:          # (a test may have started it already)
            self.start()
            self.wait_mounted()
        return self

    def wait_exit(self, timeout=DEADLINE):
        """Wait for the process; returns its exit status or raises."""
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TestFailure("nbdbridge still running %ss after it should have exited; "
                              "stderr: %s" % (timeout, self.stderr()))
        return self.returncode

    def unmount(self, timeout=DEADLINE):
        """fusermount3 -u the mount dir; returns the CompletedProcess."""
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", "fusermount3", "-u", self.mountdir]
        else:
            cmd = ["fusermount3", "-u", self.mountdir]
        return run(cmd, timeout=timeout)

    def signal(self, sig):
        os.kill(self.proc.pid, sig)

    def cleanup(self):
        """Remove the mount and reap the process no matter what; returns a
        list of problems found (empty when everything went as expected)."""
        problems = []
        if self.proc is None:
            return problems
        unmount_failed = False
        for _ in range(3):      # (3 rounds in case mounts got stacked)
            if not self.mounted():
                break
            try:
                r = self.unmount(timeout=10)
                if r.returncode != 0:
                    problems.append("fusermount3 -u failed (%d): %s" % (r.returncode, r.stderr.strip()))
                    unmount_failed = True
                    break
            except TestFailure as e:
                problems.append(str(e))
                unmount_failed = True
                break
        if self.proc.poll() is None:
            # after a failed unmount there is no point in waiting long
            wait = 2 if unmount_failed else self.timeout
            try:
                self.returncode = self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                problems.append("nbdbridge did not exit within %ss after unmount" % wait)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                problems.append("nbdbridge survived SIGKILL")
        else:
            self.returncode = self.proc.returncode
        if self.mounted():
            problems.append("mount still present after nbdbridge ended: %s" % self.mountdir)
            force_unmount(self.mountdir)
        if self.returncode is None:
            self.returncode = self.proc.returncode
        return problems

    def __exit__(self, etype, evalue, tb):
        problems = self.cleanup()
        if self.expect_exit is not None and self.returncode != self.expect_exit:
            problems.append("nbdbridge exit status %r, expected %r"
                            % (self.returncode, self.expect_exit))
        if _SANITIZER_REPORT.search(self.stderr()):
            problems.append("a sanitizer report on stderr")
        if problems and etype is None:
            raise TestFailure("; ".join(problems) + "\ncmd: %r\nstderr: %s"
                              % (self.cmd, self.stderr()[-4000:]))
        if problems:
            log("  (also during cleanup: %s)" % "; ".join(problems))
        return False


def nbdbridge_run(args, timeout=DEADLINE, **kw):
    """Run nbdbridge to completion (for cases expected to fail)."""
    d = tmpdir("run")
    errpath = os.path.join(d, "stderr")
    with open(errpath, "wb") as err, open(os.path.join(d, "stdout"), "wb") as out:
        p = popen([NBDBRIDGE] + list(args), stdout=out, stderr=err,
                  start_new_session=True, **kw)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
            try:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
    with open(errpath, errors="replace") as f:
        err = f.read()
    check_no_sanitizer_report(err, [NBDBRIDGE] + list(args))
    return rc, err


def ensure_binary():
    if not os.access(NBDBRIDGE, os.X_OK):
        raise TestFailure("nbdbridge binary not found or not executable: %s" % NBDBRIDGE)


def fill_random_file(path, size):
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n


def nbdcopy_to_file(uri, path, timeout=60):
    run(["nbdcopy", uri, path], timeout=timeout, check=True)
    with open(path, "rb") as f:
        return f.read()


def live_stats(mountdir, timeout=15):
    """`nbdbridge stats MOUNTDIR` as parsed JSON (the bridge must answer)."""
    r = run([NBDBRIDGE, "stats", mountdir], timeout=timeout)
    check_eq(r.returncode, 0, "nbdbridge stats %s (%s)" % (mountdir, r.stderr.strip()))
    return json.loads(r.stdout)


def run_python(code, timeout=DEADLINE, user=None, args=()):
    """Run a Python snippet in a child process (used for I/O that may hang)."""
    if user:
        cmd = ["runuser", "-u", user, "--", SYS_PYTHON, "-c", code] + list(args)
    else:
        cmd = [sys.executable, "-c", code] + list(args)
    return run(cmd, timeout=timeout)


def hang_report(mount):
    """Where nbdbridge (and its children) are blocked, plus stderr tail."""
    out = []
    pids = [mount.pid] + descendants(mount.pid)
    for pid in pids:
        out.append("pid %d %r state %s" % (pid, proc_cmdline(pid)[:4], proc_state(pid)))
        try:
            for tid in sorted(os.listdir("/proc/%d/task" % pid), key=int):
                try:
                    with open("/proc/%d/task/%s/wchan" % (pid, tid)) as f:
                        wchan = f.read().strip()
                    with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                        st = f.read()
                    out.append("  tid %s %s wchan=%s" % (tid, st[st.rindex(")") + 2], wchan))
                except OSError:
                    pass
        except OSError:
            pass
    out.append("FUSE requests waiting (from /sys/fs/fuse/connections, if mounted):")
    e = mount_entry(mount.mountdir)
    if e:
        minor = e["dev"].split(":")[1]
        try:
            with open("/sys/fs/fuse/connections/%s/waiting" % minor) as f:
                out.append("  waiting=%s" % f.read().strip())
        except OSError:
            out.append("  (not available)")
    out.append("nbdbridge stderr tail:\n" + mount.stderr()[-3000:])
    return "\n".join(out)


# ---------------------------------------------------------------------------
# cleanup and runner

_cleanup_hooks = []


def add_cleanup(fn):
    """Run fn() at the end of the test file (also on watchdog expiry)."""
    _cleanup_hooks.append(fn)


def _run_cleanup_hooks():
    while _cleanup_hooks:
        fn = _cleanup_hooks.pop()
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            log("cleanup hook failed: %s" % e)


def _emergency_cleanup():
    for m in mounts_under(BASE):
        force_unmount(m["mountpoint"])
    with _lock:
        procs = list(_live_procs)
    for p in procs:
        if p.poll() is None:
            try:
                p.kill()
            except OSError:
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
    for m in mounts_under(BASE):
        force_unmount(m["mountpoint"])


def _remove_base():
    if mounts_under(BASE):
        log("WARNING: mounts left under %s; not removing it" % BASE)
        return
    shutil.rmtree(BASE, ignore_errors=True)


def _final_cleanup():
    _emergency_cleanup()
    _run_cleanup_hooks()
    _remove_base()


atexit.register(_final_cleanup)


def _leftovers():
    """Problems left behind by a test: mounts under BASE, live processes."""
    problems = []
    ms = mounts_under(BASE)
    if ms:
        problems.append("mounts left behind: %s" % [m["mountpoint"] for m in ms])
    with _lock:
        procs = list(_live_procs)
    for p in procs:
        if p.poll() is None:
            problems.append("process left running: pid %d %r" % (p.pid, p.args))
    if problems:
        _emergency_cleanup()
    with _lock:
        _live_procs[:] = [p for p in _live_procs if p.poll() is None]
    return problems


def main(namespace):
    """Run every test_* function in namespace (definition order).

    Command line arguments select tests by substring.  Prints one line per
    test and a final "N passed, M failed"; exits 1 if anything failed.
    """
    tests = [(n, f) for n, f in namespace.items() if n.startswith("test_") and callable(f)]
    sel = sys.argv[1:]
    if sel:
        tests = [(n, f) for n, f in tests if any(s in n for s in sel)]
    passed = failed = skipped = 0
    state = {"passed": 0, "failed": 0}

    def watchdog():
        log("WATCHDOG: test file exceeded %ss; cleaning up" % FILE_TIMEOUT)
        try:
            _emergency_cleanup()
            _run_cleanup_hooks()
            _remove_base()
        finally:
            log("%d passed, %d failed" % (state["passed"], state["failed"] + 1))
            os._exit(1)

    timer = threading.Timer(FILE_TIMEOUT, watchdog)
    timer.daemon = True
    timer.start()
    try:
        ensure_binary()
    except TestFailure as e:
        log("FATAL: %s" % e)
        log("0 passed, %d failed" % len(tests))
        sys.exit(1)
    for name, fn in tests:
        t0 = time.monotonic()
        log("--- %s" % name)
        ok = True
        try:
            fn()
        except SkipTest as e:
            skipped += 1
            log("SKIP %s: %s" % (name, e))
            _leftovers()
            continue
        except Exception:
            ok = False
            log(traceback.format_exc().rstrip())
        left = _leftovers()
        if left:
            ok = False
            log("leftovers: %s" % "; ".join(left))
        dt = time.monotonic() - t0
        if ok:
            passed += 1
            log("PASS %s (%.1fs)" % (name, dt))
        else:
            failed += 1
            log("FAIL %s (%.1fs)" % (name, dt))
        state["passed"], state["failed"] = passed, failed
    timer.cancel()
    if skipped:
        log("(%d skipped)" % skipped)
    log("%d passed, %d failed" % (passed, failed))
    sys.exit(1 if failed else 0)
