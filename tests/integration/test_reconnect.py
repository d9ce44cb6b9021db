#!/usr/bin/env python3
"""Resilience: reconnection, retry and request timeouts, auto_unmount, --force.

What is expected (see `nbdbridge --help`):
  * When the connection to a URI / --unix / --tcp target breaks, nbdbridge
    reconnects with backoff (50 ms doubling to 1 s), checks the export is the
    same (size, read-only) and re-issues every unacknowledged request: the
    application only sees a delay.  stderr gets "lost ... reconnecting for up
    to N s" per loss and "reconnected ... after N ms" per reconnect.
    `--fd` (and `[ CMD ]`) targets are not reconnected: requests fail with EIO.
  * --retry-timeout S: after S seconds without the server, pending and new
    requests fail with EIO; the mount can still be unmounted; each further
    request tries to reconnect once.
  * A server that comes back with another size (or read-only) is refused.
  * A server stopped gracefully answers NBD_ESHUTDOWN: the bridge closes every
    connection (so it can exit) and carries the request through the restart.
  * --request-timeout S answers a request older than S with EIO.
  * auto_unmount: kill -9 of the bridge removes the mount; a stale mount is
    reported in one line and cleared by --force.

All I/O on the mounts runs in child processes with deadlines, every wait has
a deadline, and every server/mount is stopped/removed also on failure.
"""
import contextlib
import errno
import hashlib
import json
import os
import random
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import semantics_util as su  # noqa: E402

MiB = 1 << 20

LOST_RE = re.compile(r"lost .*reconnecting for up to (\d+) s")
LOST_ANY_RE = re.compile(r"\blost\b", re.IGNORECASE)
RECONNECTED_RE = re.compile(r"reconnected .*after (\d+) ms")
GAVE_UP_RE = re.compile(r"has not come back within (\d+) s")
REFUSE_RE = re.compile(r"refus", re.IGNORECASE)
NO_RECONNECT_RE = re.compile(r"lost .*fail with EIO")


# ---------------------------------------------------------------------------
# helpers

def sparse_image(size, name="disk.img"):
    p = os.path.join(h.tmpdir("img"), name)
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def random_image(size, name="disk.img"):
    p = os.path.join(h.tmpdir("img"), name)
    h.fill_random_file(p, size)
    return p


def file_sha(path, off, ln):
    with open(path, "rb") as f:
        f.seek(off)
        return hashlib.sha256(f.read(ln)).hexdigest()


def wdata(off, ln):
    """The bytes IO_CHILD writes for op w:off:ln."""
    return random.Random(off * 1000003 + ln).randbytes(ln)


def allocated(path):
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def restart_server(srv, args=None, opts=None):
    """kill -9 the nbdkit, remove its socket (nbdkit leaves it behind) and
    start the same (or the given) command on the same socket.  Returns the
    seconds from the kill until the new server accepts connections."""
    t0 = time.monotonic()
    srv.kill(signal.SIGKILL)
    srv.proc.wait(timeout=10)
    kill_server_rm_sock(srv, already_dead=True)
    if args is not None:
        srv.args = list(args)
    if opts is not None:
        srv.opts = list(opts)
    srv.start()
    return time.monotonic() - t0


def kill_server_rm_sock(srv, already_dead=False):
    if not already_dead:
        srv.kill(signal.SIGKILL)
        srv.proc.wait(timeout=10)
    if not srv.tcp and os.path.lexists(srv.sock):
        os.unlink(srv.sock)


class FixedTcpNbdkit(h.Nbdkit):
    """Nbdkit on TCP whose restart keeps the port it got the first time."""

    def __init__(self, args, opts=()):
        super().__init__(args, opts=opts, tcp=True)

    def start(self):
        if self.port is None:
            return super().start()
        cmd = (["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(self.port)]
               + self.opts + self.args)
        err = open(self.errpath, "ab")
        self.proc = h.popen(cmd, stdout=err, stderr=err)
        err.close()
        h.wait_until(lambda: self.proc.poll() is not None
                     or h._can_connect_tcp("127.0.0.1", self.port),
                     what="nbdkit to listen again on port %d" % self.port)
        if self.proc.poll() is not None:
            raise h.TestFailure("nbdkit failed to restart on port %d: %s"
                                % (self.port, self.stderr()[-2000:]))
        return self


# Child: performs the ops given as argv (r:OFF:LEN, w:OFF:LEN, f) in order on
# one fd and prints "KIND RESULT SECONDS" per op (RESULT is OK:<sha256> for
# reads, OK for writes/fsync, or the errno name).
IO_CHILD = r"""
import errno, hashlib, os, random, sys, time
path = sys.argv[1]
try:
    fd = os.open(path, os.O_RDWR)
except OSError as e:
    print("open", errno.errorcode.get(e.errno, e.errno), 0, flush=True)
    sys.exit(0)
print("opened", flush=True)
for op in sys.argv[2:]:
    parts = op.split(":")
    kind = parts[0]
    t0 = time.monotonic()
    try:
        if kind == "r":
            off, ln = int(parts[1]), int(parts[2])
            res = "OK:" + hashlib.sha256(os.pread(fd, ln, off)).hexdigest()
        elif kind == "w":
            off, ln = int(parts[1]), int(parts[2])
            n = os.pwrite(fd, random.Random(off * 1000003 + ln).randbytes(ln), off)
            res = "OK" if n == ln else "SHORT:%d" % n
        else:
            os.fsync(fd)
            res = "OK"
    except OSError as e:
        res = errno.errorcode.get(e.errno, str(e.errno))
    print("%s %s %.3f" % (kind, res, time.monotonic() - t0), flush=True)
"""


def start_io(path, ops):
    return h.popen([sys.executable, "-c", IO_CHILD, path] + list(ops),
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_io(p, timeout, what, mount=None):
    """Wait for an IO_CHILD; returns [(kind, result, seconds)]."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        report = h.hang_report(mount) if mount else ""
        p.kill()
        try:
            p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        raise h.TestFailure("%s: I/O did not return within %ss (hang)\n%s" % (what, timeout, report))
    h.check_eq(p.returncode, 0, "%s: I/O child exit status (stderr: %s)" % (what, err.strip()[-1000:]))
    res = []
    for ln in out.splitlines():
        parts = ln.split()
        if parts and parts[0] != "opened":
            res.append((parts[0], parts[1], float(parts[2])))
    return res


def io_ops(path, ops, timeout=h.DEADLINE, what="I/O", mount=None):
    return finish_io(start_io(path, ops), timeout, what, mount)


def wait_opened(p, timeout=h.DEADLINE):
    """Wait until an IO_CHILD has opened the file (its first line)."""
    line = h.readline_within(p.stdout, timeout, "the I/O child's first line")
    h.check_eq(line.strip(), "opened", "I/O child could not open the export")


# Child holding named descriptors, driven one command a line on stdin, one answer a
# line on stdout: "open NAME PATH rw|ro", "pwrite NAME OFF LEN" (IO_CHILD's bytes),
# "pread NAME OFF LEN" (OK:<sha256>), "fsync NAME", "close NAME"; the answer is OK...
# or the errno's name. The test process itself then holds no descriptor of the mount:
# a fork of it (starting nbdkit) would close copies of them, and each close is a FUSE
# FLUSH that waits for the server.
FD_CHILD = r"""
import errno, hashlib, os, random, sys
fds = {}
for line in sys.stdin:
    words = line.split()
    try:
        if words[0] == "open":
            fds[words[1]] = os.open(words[2], os.O_RDWR if words[3] == "rw" else os.O_RDONLY)
            res = "OK"
        elif words[0] == "pwrite":
            off, ln = int(words[2]), int(words[3])
            n = os.pwrite(fds[words[1]], random.Random(off * 1000003 + ln).randbytes(ln), off)
            res = "OK" if n == ln else "SHORT:%d" % n
        elif words[0] == "pread":
            res = "OK:" + hashlib.sha256(os.pread(fds[words[1]], int(words[3]), int(words[2]))).hexdigest()
        elif words[0] == "fsync":
            os.fsync(fds[words[1]])
            res = "OK"
        else:
            os.close(fds.pop(words[1]))
            res = "OK"
    except OSError as e:
        res = errno.errorcode.get(e.errno, str(e.errno))
    print(res, flush=True)
"""


class FdChild:
    """An FD_CHILD; every answer is awaited with a deadline. As a context manager it
    closes what is still open (a close flushes: the server must be there) and ends the
    child, also on failure."""

    def __init__(self, mount):
        self.mount = mount
        self.open_names = []
        self.buf = b""
        self.proc = h.popen([sys.executable, "-c", FD_CHILD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def do(self, *words, timeout=h.DEADLINE):
        line = " ".join(str(w) for w in words)
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as e:
            raise h.TestFailure("descriptor child gone before %r: %s" % (line, e))
        end = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise h.TestFailure("descriptor child: no answer to %r within %ss (hang)\n%s"
                                    % (line, timeout, h.hang_report(self.mount)))
            sel = selectors.DefaultSelector()
            sel.register(fd, selectors.EVENT_READ)
            ready = sel.select(timeout=min(left, 0.5))
            sel.close()
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise h.TestFailure("descriptor child exited on %r: %s"
                                        % (line, self.proc.stderr.read().decode(errors="replace")[-2000:]))
                self.buf += chunk
        answer, self.buf = self.buf.split(b"\n", 1)
        answer = answer.decode()
        if words[0] == "open" and answer == "OK":
            self.open_names.append(words[1])
        elif words[0] == "close":
            self.open_names.remove(words[1])
        return answer

    def __enter__(self):
        return self

    def __exit__(self, etype, *exc):
        try:
            if etype is None:
                for name in list(self.open_names):
                    h.check_eq(self.do("close", name), "OK", "close(%s)" % name)
            try:
                self.proc.stdin.close()     # (the child ends at the end of its input)
            except OSError:
                pass
            try:
                self.proc.wait(timeout=h.DEADLINE if etype is None else 5)
            except subprocess.TimeoutExpired:
                pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass      # (stuck on the mount: the end-of-test cleanup reaps it)
            self.proc.stdout.close()
            self.proc.stderr.close()
        if etype is None:
            h.check_eq(self.proc.returncode, 0, "descriptor child's exit status")
        return False


def count(regex, text):
    return len(regex.findall(text))


class Fio:
    """fio running in the background (--thread, so one process to stop)."""

    def __init__(self, path, args, name="job"):
        self.d = h.tmpdir("fio")
        self.out = os.path.join(self.d, "fio.json")
        self.errpath = os.path.join(self.d, "fio.stderr")
        self.cmd = (["fio", "--name=" + name, "--thread", "--filename=" + path,
                     "--output-format=json", "--output=" + self.out,
                     "--allow_file_create=0", "--fallocate=none", "--invalidate=0",
                     "--verify_state_save=0", "--randseed=4242"] + list(args))
        with open(self.errpath, "wb") as err:
            self.proc = h.popen(self.cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=self.d)

    def stderr(self):
        with open(self.errpath, errors="replace") as f:
            return f.read()

    def wait(self, timeout, mount=None):
        """Returns (exit status, job dict, stderr)."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            report = h.hang_report(mount) if mount else ""
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            raise h.TestFailure("fio did not finish within %ss (hang?)\n%s" % (timeout, report))
        try:
            with open(self.out) as f:
                text = f.read()
            data = json.loads(text[text.index("{"):])
            job = data["jobs"][0]
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise h.TestFailure("fio produced no JSON (rc=%s): %s\nstderr: %s"
                                % (rc, e, self.stderr()[-2000:]))
        return rc, job, self.stderr()


def check_fio_clean(rc, job, err, size, what):
    h.check_eq(rc, 0, "%s: fio exit status (stderr: %s)" % (what, err.strip()[-2000:]))
    h.check_eq(job.get("error"), 0, "%s: fio job error (errno)" % what)
    h.check_eq(job.get("total_err", 0), 0, "%s: fio total_err" % what)
    h.check(not re.search(r"verify|bad magic|crc", err, re.IGNORECASE),
            "%s: fio reported verify problems: %s" % (what, err.strip()[-2000:]))
    h.check_eq(job["write"]["io_bytes"], size, "%s: bytes written" % what)
    h.check_eq(job["read"]["io_bytes"], size, "%s: bytes read back and verified" % what)


FIO_VERIFY = ["--rw=randwrite", "--ioengine=libaio", "--iodepth=64", "--direct=1",
              "--verify=crc32c", "--do_verify=1", "--verify_fatal=1"]


# ---------------------------------------------------------------------------
# a proxy that drops the connection after N NBD requests (or T ms)

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
NBD_OPT_EXPORT_NAME, NBD_OPT_GO = 1, 7
NBD_CMD_WRITE, NBD_CMD_DISC, NBD_CMD_FLUSH = 1, 2, 3
QUIET = 0.5          # upstream silence that counts as "no replies outstanding"


class _Conn:
    def __init__(self, c, u, limit):
        self.c, self.u = c, u
        self.limit = limit          # drop after this many requests (None: never)
        self.requests = 0
        self.dropped = False        # we cut the client side
        self.client_gone = False
        self.state = "flags"        # where the client's stream is
        self.lock = threading.Lock()  # held while forwarding one unit upstream
        self.last_rx = time.monotonic()
        self.upstream_eof = threading.Event()
        self.c2s = self.s2c = 0     # bytes forwarded each way


class DropProxy(h.Proxy):
    """Unix-socket proxy in front of an NBD server that parses the client's
    request stream and cuts the client's connection (orderly) right after
    forwarding the Nth request, N drawn from `every` = (lo, hi) per
    connection, and/or after a time drawn from `after_ms` = (lo, hi), or on
    close_all().  The requests in flight are left unanswered, so the client
    has to re-issue them on its next connection.

    The server side is closed gracefully: only whole requests are forwarded,
    replies are drained until the server is quiet, then NBD_CMD_DISC is sent.
    (Closing nbdkit 1.32's socket while it still has replies to send can
    crash it: "raw_send_socket: Assertion `sock >= 0' failed".)"""

    def __init__(self, upstream, every=None, after_ms=None, seed=0, d=None):
        super().__init__(upstream, d or h.tmpdir("dproxy"))
        self.every = every
        self.after_ms = after_ms
        self.rng = random.Random(seed)
        self.lock = self._lock
        self.requests = 0            # NBD requests forwarded, all connections
        self.drops = {"requests": 0, "time": 0, "manual": 0}
        self.desync = 0              # streams we could not parse
        self.client_discs = 0        # NBD_CMD_DISC requests the client sent
        self.drop_next_after = None  # one-shot: drop after K more requests
        self.drop_at_flush = None    # one-shot: called, then drop before forwarding a flush

    def total_drops(self):
        with self.lock:
            return sum(self.drops.values())

    def _serve(self, c, u):
        with self.lock:
            limit = self.rng.randint(*self.every) if self.every else None
            ms = self.rng.randint(*self.after_ms) if self.after_ms else None
            conn = _Conn(c, u, limit)
            self.conns.append(conn)
            self.nconn += 1
        threading.Thread(target=self._client_to_server, args=(conn,), daemon=True).start()
        threading.Thread(target=self._server_to_client, args=(conn,), daemon=True).start()
        if ms is not None:
            t = threading.Timer(ms / 1000.0, self._drop, args=(conn, "time"))
            t.daemon = True
            t.start()

    def _drop(self, conn, kind, locked=False):
        """Cut the client side (the client sees the server close)."""
        if not locked:
            conn.lock.acquire()
        try:
            with self.lock:
                if conn.dropped or conn.client_gone:
                    return
                conn.dropped = True
                self.drops[kind] += 1
            try:
                conn.c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        finally:
            if not locked:
                conn.lock.release()

    def _server_to_client(self, conn):
        # Reads the server until EOF, also after the client side is gone.
        to_client = True
        while True:
            try:
                data = conn.u.recv(1 << 16)
            except OSError:
                break
            if not data:
                break
            conn.last_rx = time.monotonic()
            if to_client and not conn.dropped:
                try:
                    conn.c.sendall(data)
                    conn.s2c += len(data)
                except OSError:
                    to_client = False
        conn.upstream_eof.set()
        try:
            conn.c.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _units(self, conn, buf):
        """Parse whole units (handshake pieces, requests) from the front of
        buf; returns (bytes to forward, drop after them?)."""
        p = 0
        while True:
            if conn.state == "raw":
                return len(buf), False
            if conn.state == "flags":
                if len(buf) - p < 4:
                    return p, False
                p += 4
                conn.state = "opt"
            elif conn.state == "opt":
                if len(buf) - p < 16:
                    return p, False
                magic, opt, ln = struct.unpack_from(">QII", buf, p)
                if magic != IHAVEOPT:
                    with self.lock:
                        self.desync += 1
                    conn.state = "raw"
                    continue
                if len(buf) - p < 16 + ln:
                    return p, False
                p += 16 + ln
                if opt in (NBD_OPT_EXPORT_NAME, NBD_OPT_GO):
                    conn.state = "trans"
            else:
                if len(buf) - p < 28:
                    return p, False
                magic, _fl, typ, _ck, _off, ln = struct.unpack_from(">IHHQQI", buf, p)
                if magic != REQUEST_MAGIC:
                    with self.lock:
                        self.desync += 1
                    conn.state = "raw"
                    continue
                total = 28 + (ln if typ == NBD_CMD_WRITE else 0)
                if len(buf) - p < total:
                    return p, False
                if typ == NBD_CMD_FLUSH and self.drop_at_flush:
                    hook, self.drop_at_flush = self.drop_at_flush, None
                    hook()
                    return p, True
                p += total
                with self.lock:
                    self.requests += 1
                    conn.requests += 1
                    if typ == NBD_CMD_DISC:
                        self.client_discs += 1
                    due = conn.limit is not None and conn.requests >= conn.limit
                    if self.drop_next_after is not None:
                        self.drop_next_after -= 1
                        if self.drop_next_after <= 0:
                            self.drop_next_after = None
                            due = True
                if due:
                    return p, True

    def _client_to_server(self, conn):
        buf = bytearray()
        try:
            while True:
                try:
                    data = conn.c.recv(1 << 16)
                except OSError:
                    data = b""
                with conn.lock:
                    if conn.dropped:
                        break
                    if not data:
                        conn.client_gone = True
                        break
                    buf += data
                    n, due = self._units(conn, buf)
                    if n:
                        conn.u.sendall(buf[:n])
                        conn.c2s += n
                        del buf[:n]
                    if due:
                        self._drop(conn, "requests", locked=True)
                        break
        except OSError:
            pass
        self._close_upstream(conn)

    def _close_upstream(self, conn):
        """Say goodbye to the server once it has answered what it got."""
        try:
            if conn.dropped and conn.state == "trans":
                end = time.monotonic() + 10
                while (not conn.upstream_eof.is_set() and time.monotonic() < end
                       and time.monotonic() - conn.last_rx < QUIET):
                    conn.upstream_eof.wait(0.05)
                conn.u.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, NBD_CMD_DISC, 0, 0, 0))
            conn.u.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.upstream_eof.wait(10)
        for x in (conn.c, conn.u):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            x.close()
        with self.lock:
            if conn in self.conns:
                self.conns.remove(conn)

    def close_all(self):
        with self.lock:
            conns = list(self.conns)
        for conn in conns:
            self._drop(conn, "manual")

    def stop(self):
        self._stop = True
        with self.lock:
            conns = list(self.conns)
        for conn in conns:
            for x in (conn.c, conn.u):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._lsock:
            self._lsock.close()


# ---------------------------------------------------------------------------
# 1. kill -9 + restart of the server under fio verify

def test_fio_verify_survives_server_restart():
    size = 256 * MiB
    img = sparse_image(size)
    with h.Nbdkit(["file", img]) as srv, \
            h.Mount(h.tmpdir("mp"), ["--unix", srv.sock]) as m:
        fio = Fio(m.export, FIO_VERIFY + ["--bs=4k", "--size=128M"])
        # fio writes into a sparse image: its allocation is the progress
        h.wait_until(lambda: fio.proc.poll() is not None or allocated(img) >= 24 * MiB,
                     timeout=60, what="fio to write 24 MiB")
        h.check(fio.proc.poll() is None,
                "fio ended before the server could be killed: %s" % fio.stderr()[-1000:])
        before = allocated(img)
        dt = restart_server(srv)
        h.check(dt < 10.0, "test set-up: server restart took %.2fs (>= 10 s)" % dt)
        rc, job, err = fio.wait(90, m)
        check_fio_clean(rc, job, err, 128 * MiB, "fio across a server restart")
        h.check(before < 128 * MiB, "kill happened after the write phase (%d bytes)" % before)
        text = m.stderr()
        lost = LOST_RE.findall(text)
        rec = RECONNECTED_RE.findall(text)
        h.check(lost, "no 'lost ... reconnecting for up to N s' line on stderr: %s" % text[-2000:])
        h.check(all(s == "60" for s in lost), "lost lines name %r s, expected the default 60" % lost)
        h.check_eq(len(rec), len(lost), "'reconnected' lines vs 'lost' lines (stderr: %s)" % text[-2000:])
        worst = max(int(x) for x in rec)
        h.check(worst <= dt * 1000 + 1500,
                "reconnected after %d ms, but the server was back %.0f ms after the kill "
                "(backoff is capped at 1 s)" % (worst, dt * 1000))
        h.check(m.mounted(), "mount vanished")


def test_fio_verify_mixed_sizes_survives_restarts():
    # 4 KiB to 1 MiB writes: WRITEs handed to the socket by reference, spliced
    # READ payloads and the large-write connection are cut off by two kill -9s
    # and must be retried whole; once with the defaults, once over four data
    # connections each driven by a thread of its own, once with libnbd's own
    # socket calls. (A soak of this across eight option sets, ~110 kills, found
    # nothing; these are the widest.)
    size = 256 * MiB
    for opts in ([], ["--connections", "4", "--connection-threads", "all"], ["--socket-batching", "off"]):
        img = sparse_image(size)
        with h.Nbdkit(["file", img]) as srv, \
                h.Mount(h.tmpdir("mp"), ["--unix", srv.sock], opts=opts) as m:
            fio = Fio(m.export, FIO_VERIFY + ["--bsrange=4k-1m", "--size=128M"])
            for target in (16 * MiB, 48 * MiB):
                h.wait_until(lambda: fio.proc.poll() is not None or allocated(img) >= target,
                             timeout=60, what="fio to write %d MiB" % (target // MiB))
                h.check(fio.proc.poll() is None,
                        "fio ended before the server could be killed: %s" % fio.stderr()[-1000:])
                written = allocated(img)
                dt = restart_server(srv)
                h.check(dt < 10.0, "test set-up: server restart took %.2fs (>= 10 s)" % dt)
                h.log("  %r: kill -9 with %d MiB written" % (opts, written // MiB))
            rc, job, err = fio.wait(120, m)
            check_fio_clean(rc, job, err, 128 * MiB, "fio across two server restarts %r" % opts)
            text = m.stderr()
            h.check(count(LOST_RE, text) >= 2, "%r: fewer than two 'lost' lines: %s" % (opts, text[-2000:]))

            def every_loss_reconnected():
                text = m.stderr()
                return count(RECONNECTED_RE, text) == count(LOST_RE, text) or None
            h.wait_until(every_loss_reconnected, timeout=10,
                         what="%r: a 'reconnected' line for every 'lost' line" % opts)
            h.check(m.mounted(), "mount vanished")


# ---------------------------------------------------------------------------
# 2. server gone for good: --retry-timeout 3

def _log_has_pending_read(logfile, off):
    try:
        with open(logfile) as f:
            return any(" Read id=" in ln and "offset=0x%x" % off in ln for ln in f)
    except OSError:
        return False


@contextlib.contextmanager
def _read_held_by_the_server(opts, size=16 * MiB):
    """A file export whose reads sleep 60 s in nbdkit's delay filter, mounted with opts,
    and a 4 KiB read at 1 MiB that has reached the server. Gives (image, server, mount,
    the reading IO_CHILD, the server's log)."""
    img = random_image(size)
    logfile = os.path.join(h.tmpdir("log"), "log")
    with h.Nbdkit(["file", img, "logfile=" + logfile, "delay-read=60"],
                  opts=["--filter=log", "--filter=delay"]) as srv, \
            h.Mount(h.tmpdir("mp"), ["--unix", srv.sock], opts=opts) as m:
        child = start_io(m.export, ["r:%d:4096" % MiB])
        h.wait_until(lambda: _log_has_pending_read(logfile, MiB), what="the read to reach the server")
        h.check(child.poll() is None, "the read finished while held by the server")
        yield img, srv, m, child, logfile


def test_retry_timeout_gives_up():
    # -C 1: one data connection whatever the CPU count (auto opens 4 with 4 or more CPUs)
    with _read_held_by_the_server(["--retry-timeout", "3", "-C", "1"]) as (img, srv, m, child, logfile):
        srv.kill(signal.SIGKILL)
        srv.proc.wait(timeout=10)
        t0 = time.monotonic()
        res = finish_io(child, 15, "pending read after the server died", m)
        dt = time.monotonic() - t0
        h.check_eq([r[:2] for r in res], [("r", "EIO")], "pending read result")
        h.check(dt <= 5.0, "pending read failed %.2fs after the kill (expected <= 3 + 2 s)" % dt)
        h.check(dt >= 2.5, "pending read failed after only %.2fs: it did not wait for the "
                "3 s retry timeout" % dt)
        text = m.stderr()
        lost = LOST_RE.findall(text)
        # one line per connection: the data, large-write and block-status connections
        h.check_eq(lost, ["3", "3", "3"], "'lost ... reconnecting for up to 3 s' lines")
        h.check(GAVE_UP_RE.search(text), "no 'has not come back within 3 s' line: %s" % text[-2000:])
        # new requests: each tries once, fails with EIO promptly
        res = io_ops(m.export, ["r:0:4096", "w:8192:4096", "r:%d:4096" % (4 * MiB)],
                     timeout=20, what="new requests after giving up", mount=m)
        h.check_eq([r[:2] for r in res], [("r", "EIO"), ("w", "EIO"), ("r", "EIO")],
                   "new requests after giving up")
        for kind, _, sec in res:
            h.check(sec < 2.0, "a new %s took %.2fs to fail after giving up" % (kind, sec))
        h.check(m.mounted(), "mount vanished after giving up")
        r = m.unmount()
        h.check_eq(r.returncode, 0, "fusermount3 -u with the server gone (%s)" % r.stderr.strip())
        h.check_eq(m.wait_exit(), 0, "nbdbridge exit status after unmount")
        h.check(not m.mounted(), "mount still present after unmount")


def test_server_shutdown_reply_is_carried_through_the_restart():
    # A server stopped gracefully (SIGTERM) answers the requests it has not served with
    # NBD_ESHUTDOWN and closes. The bridge takes that for the start of an outage, not for
    # the request's answer: the read waits for the server's return and gets its bytes.
    with _read_held_by_the_server(["--retry-timeout", "20"]) as (img, srv, m, child, logfile):
        srv.kill(signal.SIGTERM)
        # nbdkit leaves only once every client has disconnected (idle ones too).
        h.wait_until(lambda: srv.proc.poll() is not None, timeout=15,
                     what="the stopped server to exit (the bridge to close every connection)")
        h.check("ESHUTDOWN" in h.read_text(logfile), "the server did not answer the read with ESHUTDOWN")
        h.check(child.poll() is None, "the read finished with the server stopped: %s"
                % (child.stdout.read() if child.poll() is not None else ""))
        kill_server_rm_sock(srv, already_dead=True)
        srv.args = ["file", img]
        srv.opts = []
        srv.start()
        res = finish_io(child, 30, "the read across the server's restart", m)
        h.check_eq([r[:2] for r in res], [("r", "OK:" + file_sha(img, MiB, 4096))], "the read")
        text = m.stderr()
        h.check(re.search(r"lost the connection .*shutting down.*reconnecting", text),
                "no 'lost ... shutting down ... reconnecting' line: %s" % text[-2000:])
        h.check(RECONNECTED_RE.search(text), "no 'reconnected' line: %s" % text[-2000:])


def test_a_graceful_stop_with_several_reads_held_is_not_taken_for_a_refusal():
    # Each held read is answered with ESHUTDOWN. The second answer arrives while the
    # first one's drain is under way: the same stop, not a server refusing right after
    # a reconnect (the message said so before).
    img = random_image(16 * MiB)
    logfile = os.path.join(h.tmpdir("log"), "log")
    with h.Nbdkit(["file", img, "logfile=" + logfile, "delay-read=60"],
                  opts=["--filter=log", "--filter=delay"]) as srv, \
            h.Mount(h.tmpdir("mp"), ["--unix", srv.sock],
                    opts=["--retry-timeout", "20", "-C", "2", "--connection-threads", "all"]) as m:
        offsets = [MiB, 2 * MiB, 3 * MiB, 4 * MiB]
        children = [start_io(m.export, ["r:%d:4096" % offset]) for offset in offsets]
        for offset in offsets:
            h.wait_until(lambda: _log_has_pending_read(logfile, offset), what="the read at %d to reach the server"
                         % offset)
        srv.kill(signal.SIGTERM)
        h.wait_until(lambda: srv.proc.poll() is not None, timeout=15,
                     what="the stopped server to exit (the bridge to close every connection)")
        h.check(h.read_text(logfile).count("ESHUTDOWN") >= 2,
                "the server answered fewer than two reads with ESHUTDOWN: %s" % h.read_text(logfile)[-2000:])
        kill_server_rm_sock(srv, already_dead=True)
        srv.args = ["file", img]
        srv.opts = []
        srv.start()
        for offset, child in zip(offsets, children):
            res = finish_io(child, 30, "the read at %d across the server's restart" % offset, m)
            h.check_eq([r[:2] for r in res], [("r", "OK:" + file_sha(img, offset, 4096))], "the read at %d" % offset)
        h.check("taken for a refusal" not in m.stderr(), "the stop was taken for a refusal: %s" % m.stderr()[-2000:])


def test_graceful_stops_in_quick_succession_are_carried_through():
    # An admin restarting the server twice in a row: the second stop comes a moment after
    # the reconnect that followed the first. The server was gone in between (the reconnect
    # needed more than one attempt), so it is a new server's stop, not a server refusing
    # with ESHUTDOWN while it stays (whose 5 s refusal window starts only when it was back
    # at once). The same for a stop right after a reconnect for another reason, a kill
    # (tools/soak found that one: a graceful stop soon after a dropped connection got EIO).
    with _read_held_by_the_server(["--retry-timeout", "20"]) as (img, srv, m, child, logfile):
        def restart_holding_reads():
            log = os.path.join(h.tmpdir("log"), "log")
            srv.args = ["file", img, "logfile=" + log, "delay-read=60"]
            srv.start()
            h.wait_until(lambda: _log_has_pending_read(log, MiB), timeout=15,
                         what="the read to be sent again to the restarted server")

        def stop_gracefully(what):
            srv.kill(signal.SIGTERM)
            h.wait_until(lambda: srv.proc.poll() is not None, timeout=15,
                         what="the server stopped gracefully (%s) to exit: the bridge to close its "
                              "connections (stderr: %s)" % (what, m.stderr()[-1500:]))
            kill_server_rm_sock(srv, already_dead=True)
            h.check(child.poll() is None, "the read finished at the %s: %s\n%s"
                    % (what, child.stdout.read() if child.poll() is not None else "", m.stderr()[-3000:]))

        stop_gracefully("first stop")
        restart_holding_reads()
        stop_gracefully("second stop, right after the first one's reconnect")
        restart_holding_reads()
        reconnects = len(RECONNECTED_RE.findall(m.stderr()))
        kill_server_rm_sock(srv)
        restart_holding_reads()
        h.wait_until(lambda: len(RECONNECTED_RE.findall(m.stderr())) > reconnects, timeout=15,
                     what="the reconnect after the kill")
        stop_gracefully("third stop, right after the kill's reconnect")
        srv.args = ["file", img]
        srv.start()
        res = finish_io(child, 30, "the read across four restarts", m)
        h.check_eq([r[:2] for r in res], [("r", "OK:" + file_sha(img, MiB, 4096))], "the read")
        h.check("taken for a refusal" not in m.stderr(), "a stop was taken for a refusal: %s" % m.stderr()[-2000:])


def test_server_refusing_with_eshutdown_but_staying():
    # A server that answers ESHUTDOWN and stays up (nbdkit's error filter here; a plugin
    # failing with ESHUTDOWN looks the same): the bridge may take it for a stop once, but
    # the request must end with EIO promptly, not cycle through drains and reconnects.
    with h.Nbdkit(["memory", str(16 * MiB), "error=ESHUTDOWN", "error-pread-rate=100%"],
                  opts=["--filter=error"]) as srv, \
            h.Mount(h.tmpdir("mp"), ["--unix", srv.sock], opts=["--retry-timeout", "2"]) as m:
        res = io_ops(m.export, ["w:0:4096", "r:0:4096", "r:8192:4096", "w:4096:4096", "r:0:4096"],
                     timeout=20, what="writes and refused reads", mount=m)
        h.check_eq([r[:2] for r in res], [("w", "OK"), ("r", "EIO"), ("r", "EIO"), ("w", "OK"), ("r", "EIO")],
                   "results")
        for kind, _, seconds in res:
            h.check(seconds < 2.0, "a %s took %.1f s" % (kind, seconds))
        drains = len(re.findall(r"shutting down \(it told", m.stderr()))
        h.check(drains <= 2, "%d 'shutting down' lines for three refused reads: %s" % (drains, m.stderr()[-2000:]))
        h.check_eq(len(re.findall(r"taken for a refusal", m.stderr())), 1, "'taken for a refusal' lines")


def test_refusal_without_reconnect_keeps_the_connection():
    # --retry-timeout 0: no reconnect, so an ESHUTDOWN refusal is just the request's
    # error; the server stays up and later requests are served on the same connections.
    d = h.tmpdir("refuse")
    refusing = os.path.join(d, "refusing")
    with h.Nbdkit(["memory", str(16 * MiB), "error=ESHUTDOWN", "error-pread-rate=100%", "error-file=" + refusing],
                  opts=["--filter=error"]) as srv, \
            h.Mount(h.tmpdir("mp"), ["--unix", srv.sock], opts=["--retry-timeout", "0"]) as m:
        open(refusing, "w").close()
        res = io_ops(m.export, ["w:0:4096", "r:0:4096"], timeout=20, what="a refused read", mount=m)
        h.check_eq([r[:2] for r in res], [("w", "OK"), ("r", "EIO")], "a write, then a refused read")
        os.unlink(refusing)
        res = io_ops(m.export, ["r:0:4096", "w:8192:4096"], timeout=20, what="requests after", mount=m)
        h.check_eq([r[:2] for r in res], [("r", "OK:" + hashlib.sha256(wdata(0, 4096)).hexdigest()), ("w", "OK")],
                   "requests once the server serves reads again")
        h.check(not LOST_ANY_RE.search(m.stderr()), "a connection was lost: %s" % m.stderr()[-2000:])


class SlowResolver:
    """nbdbridge's environment with a preloaded getaddrinfo (libslow_resolver.so) that
    takes `seconds` while start() is in effect, and logs each slow call. stop() also
    ends the slow calls under way (within 50 ms)."""

    def __init__(self, seconds):
        shim = os.environ.get("NBDBRIDGE_SLOW_RESOLVER")
        if not shim:
            raise h.SkipTest("NBDBRIDGE_SLOW_RESOLVER (built by CMake: libslow_resolver.so) not set")
        d = h.tmpdir("resolver")
        self.flag, self.log = os.path.join(d, "slow"), os.path.join(d, "log")
        self.env = dict(os.environ, LD_PRELOAD=shim, SLOW_RESOLVER_FLAG=self.flag, SLOW_RESOLVER_LOG=self.log,
                        SLOW_RESOLVER_SECONDS=str(seconds),
                        ASAN_OPTIONS=(os.environ.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0").lstrip(":"))

    def start(self):
        open(self.flag, "w").close()

    def stop(self):
        if os.path.exists(self.flag):
            os.unlink(self.flag)

    def wait_idle(self):
        """Until every slow resolution begun has ended."""
        def idle():
            text = h.read_text(self.log)
            return text.count("slow ") == text.count("done ")
        h.wait_until(idle, timeout=15, what="the slow name resolutions under way to end")

    def wait_resolving(self):
        h.wait_until(lambda: "slow localhost" in h.read_text(self.log), timeout=15,
                     what="the reconnect to resolve the name (slowly)")


@contextlib.contextmanager
def _outage_with_a_slow_resolver(resolver, opts):
    """A mount of nbd://localhost whose server has just been killed and whose reconnect
    is resolving the name slowly. Gives (server, mount)."""
    srv = FixedTcpNbdkit(["memory", str(16 * MiB)])
    with srv, h.Mount(h.tmpdir("mp"), ["nbd://localhost:%d/" % srv.port], opts=opts, env=resolver.env) as m:
        res = io_ops(m.export, ["w:0:4096"], timeout=10, what="a write before the outage", mount=m)
        h.check_eq(res[0][1], "OK", "a write before the outage")
        resolver.start()
        srv.kill(signal.SIGKILL)
        srv.proc.wait(timeout=10)
        yield srv, m


def test_slow_name_resolution_stalls_nothing_else():
    # Reconnecting to nbd://localhost resolves the name again; a slow resolver (3 s) must
    # not hold up the rest of the bridge meanwhile: a request that comes in then still
    # gets --request-timeout's EIO after 1 s, not after the resolution.
    resolver = SlowResolver(3)
    with _outage_with_a_slow_resolver(resolver, ["--request-timeout", "1", "--retry-timeout", "30"]) as (srv, m):
        resolver.wait_resolving()
        res = io_ops(m.export, ["r:0:4096"], timeout=20, what="a read during the resolution", mount=m)
        h.check_eq(res[0][1], "EIO", "the read (request timeout 1 s)")
        h.check(res[0][2] < 2.5, "the read got its EIO after %.1f s (request timeout 1 s): the loop waited "
                "for the name resolution" % res[0][2])
        srv.start()
        resolver.stop()
        h.wait_until(lambda: RECONNECTED_RE.search(m.stderr()), timeout=20, what="the reconnect")
        res = io_ops(m.export, ["r:0:4096"], timeout=30, what="a read after the server came back", mount=m)
        h.check_eq(res[0][1], "OK:" + hashlib.sha256(bytes(4096)).hexdigest(),
                   "the read after the server came back (a new, empty memory export)")


def test_retry_timeout_binds_requests_during_a_slow_name_resolution():
    # The reconnect's attempt is stuck resolving the name (5 s) when --retry-timeout (1 s)
    # runs out: the waiting read fails then, not when the resolution ends.
    resolver = SlowResolver(5)
    with _outage_with_a_slow_resolver(resolver, ["--retry-timeout", "1"]) as (srv, m):
        lost_at = time.monotonic()
        resolver.wait_resolving()
        res = io_ops(m.export, ["r:0:4096"], timeout=20, what="a read during the resolution", mount=m)
        waited = time.monotonic() - lost_at
        resolver.stop()
        h.check_eq(res[0][1], "EIO", "the read")
        h.check(waited < 3.5, "the read failed %.1f s after the loss (retry timeout 1 s; the resolution "
                "takes 5 s)" % waited)


def test_request_after_giving_up_waits_for_its_slow_reconnect():
    # Past the retry timeout each new request tries to reconnect once; that attempt may
    # take as long as a name resolution (0.5 s here), and the request waits for it.
    resolver = SlowResolver(0.5)
    with _outage_with_a_slow_resolver(resolver, ["--retry-timeout", "2"]) as (srv, m):
        h.wait_until(lambda: GAVE_UP_RE.search(m.stderr()), timeout=10, what="the bridge to give up")
        # The reconnect attempts under way then end (each fails): the read's own comes next.
        resolver.wait_idle()
        srv.start()
        slow_before = h.read_text(resolver.log).count("slow ")
        res = io_ops(m.export, ["r:0:4096"], timeout=20, what="a read after giving up", mount=m)
        resolver.stop()
        h.check_eq(res[0][1], "OK:" + hashlib.sha256(bytes(4096)).hexdigest(),
                   "a read whose reconnect attempt resolves the name for 0.5 s")
        h.check(h.read_text(resolver.log).count("slow ") > slow_before and res[0][2] >= 0.45,
                "the read took %.2f s: it did not reconnect through the slow resolution (log: %r)"
                % (res[0][2], h.read_text(resolver.log)))


def test_stop_during_a_slow_name_resolution_is_prompt():
    # The reconnect is resolving the name (for 30 s) when the bridge is told to stop:
    # it must unmount and exit at once, not wait for the name server.
    resolver = SlowResolver(30)
    try:
        with _outage_with_a_slow_resolver(resolver, ["--retry-timeout", "60"]) as (srv, m):
            resolver.wait_resolving()
            t0 = time.monotonic()
            m.signal(signal.SIGTERM)
            status = m.wait_exit(timeout=20)
            took = time.monotonic() - t0
            h.check_eq(status, 0, "nbdbridge exit status (stderr: %s)" % m.stderr()[-2000:])
            h.check(took < 3.0, "the stop took %.1f s: it waited for the name resolution" % took)
            h.check(not m.mounted(), "mount still present after the stop")
            h.check("done" not in h.read_text(resolver.log),
                    "the slow resolution ended before the bridge did: the test proves nothing")
    finally:
        resolver.stop()


def test_signal_during_a_slow_name_resolution_at_mount_is_prompt():
    # Ctrl-C while the mount's first connect resolves the name (for 30 s): one line,
    # a non-zero exit at once, nothing mounted.
    resolver = SlowResolver(30)
    mp = h.tmpdir("mp")
    resolver.start()
    p = h.popen([h.NBDBRIDGE, mp, "nbd://localhost:%d/" % h.free_tcp_port()], env=resolver.env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        resolver.wait_resolving()
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        try:
            _, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            raise h.TestFailure("nbdbridge still running 20 s after SIGINT during the name resolution")
        took = time.monotonic() - t0
        h.check(p.returncode not in (0, None), "exit status %r after SIGINT" % p.returncode)
        h.check(took < 3.0, "the exit took %.1f s: it waited for the name resolution" % took)
        h.check_eq(len(err.strip().splitlines()), 1, "lines on stderr: %r" % err)
        h.check(not h.is_mounted(mp), "something is mounted on %s" % mp)
        h.check("done" not in h.read_text(resolver.log),
                "the slow resolution ended before the bridge did: the test proves nothing")
    finally:
        resolver.stop()
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def test_unmount_while_reconnecting_to_a_silent_server():
    # The connection drops and the next one is accepted but never answered, so the
    # reconnect waits in its handshake when the mount is stopped: the bridge must close
    # that half-made connection and exit cleanly.
    one_connection = ["--connections", "1", "--replies", "structured", "--connection-threads", "off"]
    with h.Nbdkit(["memory", str(4 * MiB)]) as srv, h.StallingProxy(srv.sock) as proxy, \
            h.Mount(h.tmpdir("mp"), [proxy.uri], opts=one_connection) as m:
        h.check_eq(io_ops(m.export, ["w:0:4096"], timeout=10, what="a write", mount=m)[0][:2], ("w", "OK"),
                   "a write before the drop")
        proxy.close_one(0)
        h.wait_until(lambda: proxy.nconn >= 2, what="the bridge to try to reconnect")
        r = m.unmount()
        h.check_eq(r.returncode, 0, "fusermount3 -u while reconnecting (%s)" % r.stderr.strip())
        h.check_eq(m.wait_exit(), 0, "nbdbridge exit status (stderr: %s)" % m.stderr()[-2000:])
        h.check(not m.mounted(), "mount still present after unmount")


def test_retry_timeout_bounds_a_reconnect_to_a_silent_server():
    # The server accepts the reconnect and never answers: requests must still fail when
    # the retry timeout is over, not when the (30 s) connect timeout is.
    opts = ["--connections", "1", "--replies", "structured", "--connection-threads", "off", "--retry-timeout", "2"]
    with h.Nbdkit(["memory", str(4 * MiB)]) as srv, h.StallingProxy(srv.sock) as proxy, \
            h.Mount(h.tmpdir("mp"), [proxy.uri], opts=opts) as m:
        proxy.close_one(0)
        h.wait_until(lambda: proxy.nconn >= 2, what="the bridge to try to reconnect")
        res = io_ops(m.export, ["r:0:4096"], timeout=20, what="a read during the silent reconnect", mount=m)
        h.check_eq(res[0][1], "EIO", "the read")
        h.check(res[0][2] <= 4.0, "the read failed after %.1f s (retry timeout 2 s)" % res[0][2])
        h.wait_until(lambda: GAVE_UP_RE.search(m.stderr()), timeout=5, what="'has not come back' on stderr")


class _StallingUntilToldProxy(h.Proxy):
    """Forwards the first connection; later ones are accepted and held without a word
    while `stall` is true (a hung server), and forwarded once it is false."""
    stall = True

    def _serve(self, c, u):
        if self.nconn == 0 or not self.stall:
            return super()._serve(c, u)
        with self._lock:
            self.conns.append((c, u))
            self.nconn += 1


def test_a_reconnect_held_by_a_silent_listener_tries_again():
    # The reconnect lands on a listener that accepts and never answers (a hung server, or
    # one stopping with its socket still open) while a working server takes its place.
    # That attempt gives up after 3 s (its limit, doubling up to --connect-timeout) and
    # the next finds the working server: the read waits about that, not the 30 s connect
    # timeout.
    opts = ["--connections", "1", "--replies", "structured", "--connection-threads", "off", "--retry-timeout", "60"]
    with h.Nbdkit(["memory", str(4 * MiB)]) as srv, _StallingUntilToldProxy(srv.sock) as proxy, \
            h.Mount(h.tmpdir("mp"), [proxy.uri], opts=opts) as m:
        proxy.close_one(0)
        h.wait_until(lambda: proxy.nconn >= 2, what="the bridge's reconnect to reach the silent listener")
        proxy.stall = False
        res = io_ops(m.export, ["r:0:4096"], timeout=25, what="a read during the silent reconnect", mount=m)
        h.check_eq(res[0][1], "OK:" + hashlib.sha256(bytes(4096)).hexdigest(), "the read")
        h.check(res[0][2] < 8.0, "the read waited %.1f s for the reconnect (3 s attempt limit)" % res[0][2])


def test_nbd_span_leaves_out_the_outage():
    # A read that waits through a reconnect: the application saw the outage, the
    # server did not. Its NBD span is the command sent once the server was back.
    import threading
    size = 8 * MiB
    img = random_image(size)
    with h.Nbdkit(["file", img]) as srv, \
            h.Mount(h.tmpdir("mp"), ["--unix", srv.sock], opts=["--retry-timeout", "20", "-C", "1"]) as m:
        kill_server_rm_sock(srv)
        results = []
        reader = threading.Thread(target=lambda: results.extend(
            io_ops(m.export, ["r:4096:4096"], timeout=20, what="read during the outage", mount=m)), daemon=True)
        reader.start()
        reader.join(timeout=1.2)
        h.check(reader.is_alive(), "the read ended with no server: %r" % results)
        srv.start()
        reader.join(timeout=20)
        h.check_eq([r[:2] for r in results], [("r", "OK:" + file_sha(img, 4096, 4096))], "the read")
        r = h.run([h.NBDBRIDGE, "stats", m.mountdir], timeout=15, check=True)
        read = json.loads(r.stdout)["operations"]["read"]
        h.check(read["fuse_latency_us"]["max"] >= 1000000, "the read's own span: %r" % read["fuse_latency_us"])
        h.check(read["nbd_latency_us"]["max"] < 500000, "the NBD span of the read includes the outage: %r"
                % read["nbd_latency_us"])


def test_retry_timeout_then_server_returns():
    size = 8 * MiB
    img = random_image(size)
    with h.Nbdkit(["file", img]) as srv, \
            h.Mount(h.tmpdir("mp"), ["--unix", srv.sock], opts=["--retry-timeout", "3", "-C", "1"]) as m:
        res = io_ops(m.export, ["r:0:4096"], what="read before the kill", mount=m)
        h.check_eq(res[0][1], "OK:" + file_sha(img, 0, 4096), "read before the kill")
        kill_server_rm_sock(srv)
        t0 = time.monotonic()
        res = io_ops(m.export, ["r:4096:4096"], timeout=15, what="read during the outage", mount=m)
        h.check_eq(res[0][1], "EIO", "read with the server gone past the retry timeout")
        h.check(time.monotonic() - t0 <= 5.0, "read took more than 3 + 2 s to fail")
        h.wait_until(lambda: GAVE_UP_RE.search(m.stderr()), timeout=5,
                     what="'has not come back within 3 s' on stderr")
        h.check(not RECONNECTED_RE.search(m.stderr()), "'reconnected' with no server")
        srv.start()           # same command, same socket
        res = io_ops(m.export, ["r:%d:65536" % (2 * MiB), "w:%d:65536" % (3 * MiB),
                                "f", "r:%d:65536" % (3 * MiB)],
                     timeout=15, what="requests after the server came back", mount=m)
        h.check_eq([r[:2] for r in res],
                   [("r", "OK:" + file_sha(img, 2 * MiB, 65536)), ("w", "OK"), ("f", "OK"),
                    ("r", "OK:" + hashlib.sha256(wdata(3 * MiB, 65536)).hexdigest())],
                   "a new request after the give-up reconnects (once) and succeeds")
        h.check_eq(file_sha(img, 3 * MiB, 65536), hashlib.sha256(wdata(3 * MiB, 65536)).hexdigest(),
                   "data written after the reconnect is on the server")
        h.check(RECONNECTED_RE.search(m.stderr()), "no 'reconnected' line: %s" % m.stderr()[-2000:])
        # Every connection comes back (the one data connection -C 1 asked for, large-write,
        # block status), not only the one the first request tried.
        def reconnects():
            r = h.run([h.NBDBRIDGE, "stats", m.mountdir], timeout=15)
            return [c["reconnects"] for c in json.loads(r.stdout)["connections"]] if r.returncode == 0 else []
        h.check_eq(len(reconnects()), 3, "connections of the mount")
        h.wait_until(lambda: all(n >= 1 for n in reconnects()), timeout=10,
                     what="every connection to reconnect")


def _fsync_errno(fd):
    try:
        os.fsync(fd)
        return "OK"
    except OSError as e:
        return h.errno_name(e.errno)


def _restart_within_the_retry_window(srv, m):
    """kill -9 the server and start it again, while the bridge is still retrying."""
    kill_server_rm_sock(srv)
    h.wait_until(lambda: LOST_RE.search(m.stderr()), timeout=10, what="'lost' line on stderr")
    srv.start()


def _check_not_given_up(m, when):
    h.check(not GAVE_UP_RE.search(m.stderr()), "test set-up: the bridge gave up on the server %s, so this "
            "tests a reconnect after giving up, not a restart within the retry window: %s"
            % (when, m.stderr()[-2000:]))


# Long enough for any restart of the server to fall inside it (under ASan and a busy CPU).
FSYNC_RETRY = ["--retry-timeout", "10"]


def _write_then_restart(flush_first):
    """fsync results after a kill -9 and restart of the server within the retry window,
    with a 64 KiB write acknowledged before the kill (flushed first or not): the file
    stays open throughout, since close() flushes too."""
    img = random_image(4 * MiB)
    with h.Nbdkit(["file", img]) as srv, \
            h.Mount(h.tmpdir("mp"), ["--unix", srv.sock], opts=FSYNC_RETRY) as m, FdChild(m) as io:
        h.check_eq(io.do("open", "f", m.export, "rw"), "OK", "open")
        h.check_eq(io.do("pwrite", "f", 0, 65536), "OK", "the write before the kill")
        if flush_first:
            h.check_eq(io.do("fsync", "f"), "OK", "fsync before the kill")
        _restart_within_the_retry_window(srv, m)
        h.check_eq(io.do("pread", "f", MiB, 4096), "OK:" + file_sha(img, MiB, 4096), "a read through the reconnect")
        _check_not_given_up(m, "before the fsyncs")
        return [io.do("fsync", "f"), io.do("fsync", "f")]


def test_fsync_tells_of_writes_a_restarted_server_may_have_lost():
    # Acknowledged, not yet flushed, and every connection went: the server may have lost
    # them with its cache (a restart), so the next fsync fails, once; the flush itself
    # is still sent.
    h.check_eq(_write_then_restart(flush_first=False), ["EIO", "OK"], "fsyncs after the restart")


def test_fsync_tells_every_open_file_of_writes_a_restarted_server_may_have_lost():
    # As Linux reports a writeback error to each open file description: a reader's fsync
    # (`sync FILE`) must not take the error away from the writer's. A file opened after the
    # loss is told too while no open file has been told yet; one opened after that is not.
    img = random_image(4 * MiB)
    with h.Nbdkit(["file", img]) as srv, \
            h.Mount(h.tmpdir("mp"), ["--unix", srv.sock], opts=FSYNC_RETRY) as m, FdChild(m) as io:
        h.check_eq(io.do("open", "writer", m.export, "rw"), "OK", "open the writer")
        h.check_eq(io.do("open", "reader", m.export, "ro"), "OK", "open the reader")
        h.check_eq(io.do("pwrite", "writer", 0, 65536), "OK", "the write before the kill")
        _restart_within_the_retry_window(srv, m)
        h.check_eq(io.do("pread", "reader", MiB, 4096), "OK:" + file_sha(img, MiB, 4096),
                   "a read through the reconnect")
        h.check_eq(io.do("open", "later0", m.export, "ro"), "OK", "open after the loss")
        _check_not_given_up(m, "before the fsyncs")
        results = [io.do("fsync", name) for name in ("later0", "reader", "writer", "writer")]
        h.check_eq(io.do("open", "later1", m.export, "rw"), "OK", "open once all were told")
        results.append(io.do("fsync", "later1"))
        h.check_eq(results, ["EIO", "EIO", "EIO", "OK", "OK"],
                   "fsyncs: a file opened after the loss, the reader, the writer twice, a file opened "
                   "once all were told")


def test_fsync_after_a_restart_with_everything_flushed():
    h.check_eq(_write_then_restart(flush_first=True), ["OK", "OK"], "fsyncs after the restart")


def test_fsync_after_one_of_several_connections_dropped():
    # Under multi-conn, while another connection stays up the server is alive and keeps
    # the dropped connection's writes in the cache all connections share: fsync succeeds.
    opts = ["--connections", "2", "--replies", "structured", "--connection-threads", "off"]
    with h.Nbdkit(["memory", str(64 * MiB)]) as srv, h.Proxy(srv.sock) as proxy, \
            h.Mount(h.tmpdir("mp"), [proxy.uri], opts=opts) as m:
        h.check_eq(proxy.nconn, 2, "connections through the proxy")
        fd = os.open(m.export, os.O_RDWR)
        try:
            for connection in (0, 1):
                h.check_eq(os.pwrite(fd, wdata(0, 65536), 0), 65536, "a write")
                proxy.close_one(connection)
                # Reconnected, not only accepted by the proxy: a loss with no connection
                # established leaves the writes' fate unknown (fsync EIO), by design.
                h.wait_until(lambda: count(RECONNECTED_RE, m.stderr()) >= 1 + connection, timeout=10,
                             what="the bridge to reconnect connection %d" % connection)
                h.check_eq(_fsync_errno(fd), "OK", "fsync after dropping connection %d" % connection)
        finally:
            os.close(fd)


def test_odsync_write_lost_with_the_servers_cache_is_written_again():
    # A server without FUA: an O_DSYNC write is a write, then a flush. The connection
    # drops as the flush is sent and the server loses the write with its cache (the
    # hook puts the old bytes back); the flush, retried on the next connection,
    # succeeds. The write must not be reported durable: it is written again.
    img = random_image(4 * MiB)
    with open(img, "rb") as f:
        old = f.read(65536)
    def lose_the_cache():
        with open(img, "r+b") as f:
            f.write(old)
    with h.Nbdkit(["file", img], opts=["--filter=fua"]) as srv, DropProxy(srv.sock) as proxy, \
            h.Mount(h.tmpdir("mp"), [proxy.uri], opts=FSYNC_RETRY + ["-C", "1"]) as m:
        fd = os.open(m.export, os.O_RDWR | os.O_DSYNC)
        try:
            proxy.drop_at_flush = lose_the_cache
            h.check_eq(os.pwrite(fd, wdata(0, 65536), 0), 65536, "the O_DSYNC write")
            h.check(proxy.drop_at_flush is None, "test set-up: the proxy saw no flush")
            h.check_eq(file_sha(img, 0, 65536), hashlib.sha256(wdata(0, 65536)).hexdigest(),
                       "the O_DSYNC write is on the server after it returned")
        finally:
            os.close(fd)


def test_close_flushes_writes_of_a_dropped_connection():
    # A write acknowledged on a connection that then dropped was covered by no flush: the
    # close() after the reconnect must still send one (the server survived and may hold
    # the write in its cache), though the new connection itself has written nothing.
    logfile = os.path.join(h.tmpdir("log"), "log")
    opts = ["--connections", "1", "--replies", "structured", "--connection-threads", "off"]
    with h.Nbdkit(["memory", str(64 * MiB), "logfile=" + logfile], opts=["--filter=log"]) as srv, \
            h.Proxy(srv.sock) as proxy, h.Mount(h.tmpdir("mp"), [proxy.uri], opts=opts) as m:
        fd = os.open(m.export, os.O_RDWR)
        try:
            h.check_eq(os.pwrite(fd, wdata(0, 65536), 0), 65536, "a write")
            proxy.close_one(0)
            h.wait_until(lambda: RECONNECTED_RE.search(m.stderr()), timeout=10, what="the reconnect")
            flushes_before = su.count_acts(logfile, "Flush")
        finally:
            os.close(fd)
        h.wait_until(lambda: su.count_acts(logfile, "Flush") > flushes_before, timeout=5,
                     what="a flush from close() after the reconnect")


# ---------------------------------------------------------------------------
# 3. the server comes back as a different export

def _check_refused(restart_args, restart_opts, what, change):
    """change: the difference the refusal must name, one of the comma-separated items
    in "refusing to reconnect: the export changed (...)"."""
    size = 4 * MiB
    img = random_image(size)
    with h.Nbdkit(["file", img]) as srv, \
            h.Mount(h.tmpdir("mp"), ["--unix", srv.sock]) as m:
        res = io_ops(m.export, ["r:0:4096"], what="read before the kill", mount=m)
        h.check_eq(res[0][1], "OK:" + file_sha(img, 0, 4096), "read before the kill")
        kill_server_rm_sock(srv)
        pending = start_io(m.export, ["r:8192:4096"])
        wait_opened(pending)
        h.wait_until(lambda: LOST_RE.search(m.stderr()), timeout=10, what="'lost' line on stderr")
        h.check(pending.poll() is None,
                "a read during the outage returned at once (expected it to wait for the server)")
        srv.args = restart_args(img)
        srv.opts = restart_opts
        srv.start()
        t0 = time.monotonic()
        h.wait_until(lambda: REFUSE_RE.search(m.stderr()), timeout=10,
                     what="nbdbridge to refuse the %s" % what)
        res = finish_io(pending, 10, "read pending when the %s came back" % what, m)
        h.check_eq([r[:2] for r in res], [("r", "EIO")], "pending read after the %s came back" % what)
        h.check(time.monotonic() - t0 < 5.0, "pending read took >= 5 s to fail after the refusal")
        refusals = [ln for ln in m.stderr().splitlines() if REFUSE_RE.search(ln)]
        named = re.compile(r"refusing to reconnect: the export changed \((?:[^)]*, )?%s(?:, [^)]*)?\)"
                           % re.escape(change))
        h.check(all(named.search(ln) for ln in refusals),
                "the refusal of the %s does not name the change (%r): %r" % (what, change, refusals))
        res = io_ops(m.export, ["r:0:4096", "w:0:4096"], timeout=10, what="new requests", mount=m)
        h.check_eq([r[:2] for r in res], [("r", "EIO"), ("w", "EIO")],
                   "new requests after refusing the %s" % what)
        for kind, _, sec in res:
            h.check(sec < 2.0, "a new %s took %.2fs to fail" % (kind, sec))
        h.check(not RECONNECTED_RE.search(m.stderr()),
                "stderr says 'reconnected' to the %s: %s" % (what, m.stderr()[-2000:]))
        h.check(m.mounted(), "mount vanished")
        # Said once, not once for each connection that finds the change.
        h.check_eq(len([ln for ln in m.stderr().splitlines() if REFUSE_RE.search(ln)]), 1, "refusal lines")


def test_different_size_refused():
    def bigger(img):
        other = sparse_image(8 * MiB, "other.img")
        return ["file", other]
    _check_refused(bigger, [], "export with a different size", "size %d -> %d" % (4 * MiB, 8 * MiB))


def test_readonly_export_refused():
    _check_refused(lambda img: ["file", img], ["-r"], "read-only export", "read-only flag changed")


def test_export_with_a_minimum_block_refused():
    # Requests were planned for any alignment: libnbd would refuse unaligned ones now.
    _check_refused(lambda img: ["file", img, "blocksize-minimum=4096"], ["--filter=blocksize-policy"],
                   "export with a minimum block", "minimum block 1 -> 4096")


def test_export_without_fua_refused():
    # O_DSYNC writes were to go out with FUA, which this server no longer takes.
    # (nbdkit 1.32 calls that mode of its fua filter "none" but only takes it as the default)
    _check_refused(lambda img: ["file", img], ["--filter=fua"], "export without FUA", "FUA dropped")


def _server_back_without_block_status(opts):
    """A server restarted without structured replies (so without base:allocation) is
    the same export: the mount goes on, and lseek and st_blocks take it all as data."""
    size = 4 * MiB
    img = sparse_image(size)
    data = random.Random(11).randbytes(64 * 1024)
    with open(img, "r+b") as f:
        f.seek(MiB)
        f.write(data)
    with h.Nbdkit(["file", img]) as srv, \
            h.Mount(h.tmpdir("mp"), ["--unix", srv.sock], opts=opts) as m:
        fd = os.open(m.export, os.O_RDONLY)
        try:
            h.check_eq(os.lseek(fd, 0, os.SEEK_DATA), MiB, "SEEK_DATA before the restart")
            restart_server(srv, opts=["--no-sr"])
            h.wait_until(lambda: RECONNECTED_RE.search(m.stderr()), timeout=10, what="the reconnect")
            h.check_bytes(h.pread_full(fd, len(data), MiB), data, "read after the restart")
            h.wait_until(lambda: "without block status" in m.stderr(), timeout=10,
                         what="a line saying block status is gone")
            h.check_eq(os.lseek(fd, 0, os.SEEK_DATA), 0, "SEEK_DATA after the restart (all data)")
            h.check_eq(os.lseek(fd, 4096, os.SEEK_HOLE), size, "SEEK_HOLE after the restart (only EOF)")
            h.check_eq(h.os_errno(os.lseek, fd, size, os.SEEK_DATA)[0], errno.ENXIO, "SEEK_DATA at EOF")
        finally:
            os.close(fd)
        h.check(not REFUSE_RE.search(m.stderr()), "refused the server: %s" % m.stderr()[-2000:])


def test_server_back_without_block_status():
    _server_back_without_block_status([])


def test_server_back_without_block_status_structured_replies():
    # Every connection carries block status here, not a connection of its own.
    _server_back_without_block_status(["--replies", "structured"])


# ---------------------------------------------------------------------------
# 4. faults under load

def test_delay_no_false_request_timeouts():
    img = sparse_image(64 * MiB)
    with h.Nbdkit(["file", img, "rdelay=50ms", "wdelay=50ms"], opts=["--filter=delay"]) as srv, \
            h.Mount(h.tmpdir("mp"), ["--unix", srv.sock], opts=["--request-timeout", "5"]) as m:
        # 4 MiB: 256 writes and 256 verifying reads, each held 50 ms, 64 at a time
        fio = Fio(m.export, FIO_VERIFY + ["--bs=16k", "--size=4M"])
        rc, job, err = fio.wait(60, m)
        check_fio_clean(rc, job, err, 4 * MiB, "fio with 50 ms server delays")
        lat = job["write"]["clat_ns"]["max"]
        h.check(lat >= 50e6, "max write latency %.1f ms < 50 ms: delay filter not in effect" % (lat / 1e6))
        text = m.stderr()
        h.check(not re.search(r"time|lost|reconnect", text, re.IGNORECASE),
                "unexpected stderr with --request-timeout 5: %s" % text[-2000:])


def test_connection_dropped_every_n_requests():
    _connection_drops()


def test_connection_dropped_among_1m_requests():
    # 1 MiB READs are answered through pipes (--spliced-reads): a connection cut
    # with payloads half in a pipe must leave it clean for the retry and after.
    # Depth 8: a connection cut after 10-30 requests must leave some answered.
    _connection_drops(fio_args=["--bs=1M", "--iodepth=8"], size=64 * MiB, every=(10, 30))


def test_connection_threads_dropped_every_n_requests():
    # The same with each connection driven by a thread of its own: losses are
    # noticed there and reported to the loop, commands in flight fail over.
    _connection_drops(["--connection-threads", "all"])


def test_dropped_connections_leave_no_threads_behind():
    # Every NBD connection on a thread of its own, all dropped ten times: each lost
    # connection's thread ends, so the bridge's thread count stays where it started.
    opts = ["--connections", "2", "--connection-threads", "all"]
    with h.Nbdkit(["memory", str(16 * MiB)]) as srv, h.Proxy(srv.sock) as proxy, \
            h.Mount(h.tmpdir("mp"), [proxy.uri], opts=opts) as m:
        per_round = proxy.nconn
        threads = lambda: len(os.listdir("/proc/%d/task" % m.pid))  # noqa: E731
        started_with = threads()
        for round_no in range(1, 11):
            proxy.close_all()
            h.wait_until(lambda: proxy.nconn >= per_round * (round_no + 1), timeout=15,
                         what="every connection to come back (round %d)" % round_no)
            res = io_ops(m.export, ["w:0:4096", "r:0:4096"], timeout=15, what="I/O after the drops", mount=m)
            h.check_eq([r[0] + r[1][:2] for r in res], ["wOK", "rOK"], "I/O after round %d" % round_no)
        h.check(threads() <= started_with + per_round,
                "threads: %d at the start, %d after ten rounds of drops" % (started_with, threads()))


def test_unmount_says_goodbye_on_every_connection():
    # Requests held back for one sendmsg (socket batching) and the NBD_CMD_DISC
    # that closing a connection queues must reach the server before the socket
    # closes: the proxy sees a DISC from the client on every connection it carried.
    img = sparse_image(64 * MiB)
    for opts in ([], ["--connection-threads", "all"], ["--socket-batching", "off"]):
        with h.Nbdkit(["file", img]) as srv, DropProxy(srv.sock, seed=1) as px:
            with h.Mount(h.tmpdir("mp"), [px.uri], opts=opts) as m:
                fio = Fio(m.export, FIO_VERIFY + ["--bs=4k", "--size=8M"])
                rc, job, err = fio.wait(60, m)
                check_fio_clean(rc, job, err, 8 * MiB, "fio before unmount %r" % opts)
            h.check(px.nconn >= 2, "test set-up: only %d connection(s) through the proxy" % px.nconn)
            h.wait_until(lambda: px.client_discs == px.nconn or None, timeout=10,
                         what="NBD_CMD_DISC on all %d connections %r (seen %d)"
                         % (px.nconn, opts, px.client_discs))
            h.check_eq(px.desync, 0, "proxy could not follow the NBD stream")


def _connection_drops(opts=(), fio_args=("--bs=4k",), size=32 * MiB, every=(300, 1500)):
    img = sparse_image(64 * MiB)
    with h.Nbdkit(["file", img]) as srv, \
            DropProxy(srv.sock, every=every, seed=7) as px, \
            h.Mount(h.tmpdir("mp"), [px.uri], opts=list(opts)) as m:
        fio = Fio(m.export, FIO_VERIFY + list(fio_args) + ["--size=%d" % size])
        rc, job, err = fio.wait(90, m)
        h.check(srv.proc.poll() is None, "test set-up: nbdkit died behind the proxy (status %s): %s"
                % (srv.proc.poll(), srv.stderr()[-1000:]))
        check_fio_clean(rc, job, err, size, "fio with connection drops")
        h.check_eq(px.desync, 0, "proxy could not follow the NBD stream")
        drops = px.total_drops()
        h.check(drops >= 5, "only %d drops happened (%d requests forwarded)" % (drops, px.requests))

        def settled():
            text = m.stderr()
            return (count(LOST_RE, text) == drops and count(RECONNECTED_RE, text) == drops) or None
        try:
            h.wait_until(settled, timeout=10, what="lost/reconnected lines to match the drops")
        except h.TestFailure:
            text = m.stderr()
            raise h.TestFailure("proxy dropped %d connections; stderr has %d 'lost ... reconnecting' "
                                "and %d 'reconnected' lines:\n%s"
                                % (drops, count(LOST_RE, text), count(RECONNECTED_RE, text),
                                   text[-3000:]))
        h.log("  %d drops over %d requests, %d connections" % (drops, px.requests, px.nconn))


# ---------------------------------------------------------------------------
# 5. injected server errors are errors, not disconnects

def test_error_filter_not_a_disconnect():
    img = sparse_image(64 * MiB)
    with h.Nbdkit(["file", img, "error-pread-rate=1%", "error-pwrite-rate=1%"],
                  opts=["--filter=error"]) as srv, \
            h.Mount(h.tmpdir("mp"), ["--unix", srv.sock]) as m:
        fio = Fio(m.export, ["--rw=randrw", "--bs=4k", "--size=32M", "--iodepth=64",
                             "--ioengine=libaio", "--direct=1", "--continue_on_error=all"])
        rc, job, err = fio.wait(60, m)
        ios = job["read"]["total_ios"] + job["write"]["total_ios"]
        injected = srv.stderr().count("injecting EIO error into")
        nerr = job.get("total_err", 0)
        h.check(ios >= 8192, "fio did only %d I/Os (expected >= 8192)" % ios)
        h.check(injected > 0, "the error filter injected nothing")
        h.check_eq(nerr, injected, "failed fio I/Os vs errors injected by the server")
        h.check(nerr < ios * 0.05, "%d of %d I/Os failed" % (nerr, ios))
        h.check_eq(job.get("first_error"), errno.EIO, "fio first_error")
        text = m.stderr()
        h.check(not LOST_ANY_RE.search(text) and "reconnect" not in text,
                "injected EIO was treated as a disconnect: %s" % text[-2000:])
        res = io_ops(m.export, ["w:0:4096"] * 20, what="I/O after fio", mount=m)
        h.check(sum(r[1] == "OK" for r in res) >= 14,
                "bridge no longer serving after errors: %r" % res)
        h.check(m.mounted(), "mount vanished")


# ---------------------------------------------------------------------------
# 6. kill -9 of the bridge: auto_unmount, remount, stale mount + --force

WORKER = su.threaded_io_worker(1 * MiB, 32 * MiB, alignment=4096)


def _helpers(pid):
    return [p for p in h.descendants(pid) if "fusermount" in " ".join(h.proc_cmdline(p))]


def test_kill9_bridge_auto_unmount_and_remount():
    size = 64 * MiB
    img = sparse_image(size)
    mp = h.tmpdir("mp")
    with h.Nbdkit(["file", img]) as srv, \
            h.Mount(mp, ["--unix", srv.sock], expect_exit=None) as m1:
        res = io_ops(m1.export, ["w:0:1048576", "f"], what="write before the kill", mount=m1)
        h.check_eq([r[:2] for r in res], [("w", "OK"), ("f", "OK")], "write before the kill")
        helpers = _helpers(m1.pid)
        h.check(helpers, "no fusermount3 auto_unmount helper under nbdbridge")
        h.check(any("auto_unmount" in " ".join(h.proc_cmdline(p)) for p in helpers),
                "helper without auto_unmount: %r" % [h.proc_cmdline(p) for p in helpers])
        worker = h.popen([sys.executable, "-c", WORKER, m1.export],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        h.check_eq(h.readline_within(worker.stdout, h.DEADLINE, "the I/O workers").strip(), "progress",
                   "I/O workers got going")
        os.kill(m1.pid, signal.SIGKILL)
        m1.proc.wait(timeout=10)
        t0 = time.monotonic()
        h.wait_until(lambda: not m1.mounted(), timeout=5,
                     what="auto_unmount to remove the mount after kill -9 of nbdbridge")
        h.log("  mount gone %.2fs after kill -9" % (time.monotonic() - t0))
        try:
            out, err = worker.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
            try:
                worker.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                pass      # (stuck on the mount: the end-of-test cleanup reaps it)
            raise h.TestFailure("I/O on the mount hung after nbdbridge was killed")
        results = sorted(ln for ln in out.split("\n") if ln.startswith("T"))
        h.check_eq(len(results), 4, "every I/O thread got an error (stdout %r, stderr %r)" % (out, err))
        h.log("  I/O threads got: %s" % ", ".join(results))
        h.wait_until(lambda: not any(h.pid_alive(p) for p in helpers), timeout=5,
                     what="the fusermount3 helper to exit")
        with h.Mount(mp, ["--unix", srv.sock]) as m2:
            res = io_ops(m2.export, ["r:0:1048576"], what="read after remount", mount=m2)
            h.check_eq(res[0][1], "OK:" + hashlib.sha256(wdata(0, 1048576)).hexdigest(),
                       "data written before the kill, read through a new bridge")


def _stale_mount_case(used, named=False):
    """Make a stale mount (kill -9 the bridge and its fusermount3
    auto_unmount helper), then: without --force one clear line and a
    non-zero exit; with --force a working mount.  used: whether the mount
    was used (files opened, so the kernel has cached the mountpoint's
    attributes) before it went stale, as any real mount would be.  named:
    the DIRECTORY/NAME form, mounted on DIRECTORY (the path itself is then
    inside the dead mount)."""
    size = 64 * MiB
    img = sparse_image(size)
    mp = h.tmpdir("mp")
    if named:
        mp = os.path.join(mp, "disk.img")
    expect = hashlib.sha256(wdata(0, 65536) if used else bytes(65536)).hexdigest()
    with h.Nbdkit(["file", img]) as srv:
        m1 = h.Mount(mp, ["--unix", srv.sock], expect_exit=None)
        pidfile = os.path.join(h.tmpdir("pid"), "pid")
        m2 = h.Mount(mp, ["--unix", srv.sock], opts=["--force", "--pidfile", pidfile])
        try:
            with m1:
                if used:
                    res = io_ops(m1.export, ["w:0:65536", "f"], what="write", mount=m1)
                    h.check_eq([r[:2] for r in res], [("w", "OK"), ("f", "OK")], "write")
                helpers = _helpers(m1.pid)
                h.check(helpers, "no fusermount3 auto_unmount helper under nbdbridge")
                for p in helpers:
                    os.kill(p, signal.SIGKILL)
                os.kill(m1.pid, signal.SIGKILL)
                m1.proc.wait(timeout=10)
                h.wait_until(lambda: not any(h.pid_alive(p) for p in helpers), timeout=5,
                             what="helper to die")
                h.check(m1.mounted(), "no stale mount left (could not make one)")
                e, _ = h.os_errno(os.statvfs, m1.mountdir)
                h.check_eq(h.errno_name(e), "ENOTCONN", "statfs on the stale mount")
                problems = []
                rc, err = h.nbdbridge_run([mp, "--unix", srv.sock], timeout=20)
                lines = [ln for ln in err.splitlines() if ln.strip()]
                if rc == "timeout":
                    problems.append("without --force: nbdbridge hung")
                elif rc == 0:
                    problems.append("without --force: exit status 0")
                if len(lines) != 1:
                    problems.append("without --force: %d stderr lines, expected 1: %r" % (len(lines), err))
                elif not (re.search(r"stale", lines[0], re.I) and re.search(r"not connected", lines[0], re.I)
                          and "--force" in lines[0] and "fusermount3 -u %s " % m1.mountdir in lines[0]):
                    problems.append("without --force: message does not say stale / not connected / "
                                    "--force / fusermount3 -u %s: %r (exit %r)" % (m1.mountdir, lines[0], rc))
                if not m1.mounted():
                    problems.append("the run without --force changed the stale mount")
                def new_mount_or_exit():
                    return m2.proc.poll() is not None or (os.path.exists(pidfile) and m2.mounted())
                m2.start()      # (Mount.__enter__ would take the stale mount for the new one:
                # the pidfile says when the new mount is live)
                h.wait_until(new_mount_or_exit, what="nbdbridge --force to mount or exit")
                if m2.proc.poll() is not None:
                    problems.append("with --force: nbdbridge exited %r without mounting: %s"
                                    % (m2.proc.returncode, m2.stderr().strip()))
                    m2.expect_exit = None
                    h.check(False, "; ".join(problems))
                try:
                    with m2:
                        entries = [x for x in h.fuse_mounts() if x["mountpoint"] == m2.mountdir]
                        h.check_eq(len(entries), 1, "mounts at the mountpoint after --force")
                        res = io_ops(m2.export, ["r:0:65536"], what="read with --force", mount=m2)
                        h.check_eq(res[0][1], "OK:" + expect, "data through the --force mount")
                    h.check(not h.is_mounted(m2.mountdir), "mount left after unmounting the --force mount")
                except h.MountFailed as e:
                    problems.append("with --force: nbdbridge did not mount (exit %r): %s"
                                    % (e.returncode, e.stderr.strip()))
                h.check(not problems, "; ".join(problems))
        finally:
            if h.is_mounted(m1.mountdir):
                h.force_unmount(m1.mountdir)
            m2.cleanup()


def test_stale_mount_unused_and_force():
    _stale_mount_case(used=False)


def test_stale_mount_after_use_and_force():
    _stale_mount_case(used=True)


def test_stale_mount_of_directory_name_form_and_force():
    _stale_mount_case(used=True, named=True)


# ---------------------------------------------------------------------------
# 7. --request-timeout

def test_timed_out_write_is_never_sent_later():
    # A write answered with EIO by --request-timeout while the server is away must not be
    # carried out when it comes back: the application may already have written the range again.
    img = random_image(4 * MiB)
    before = file_sha(img, 0, 65536)
    with h.Nbdkit(["file", img]) as srv, \
            h.Mount(h.tmpdir("mp"), ["--unix", srv.sock],
                    opts=["--request-timeout", "1", "--retry-timeout", "20"]) as m:
        kill_server_rm_sock(srv)
        h.wait_until(lambda: LOST_RE.search(m.stderr()), timeout=10, what="'lost' line on stderr")
        res = io_ops(m.export, ["w:0:65536", "r:0:65536"], timeout=15, what="a write and a read while the server "
                     "is away", mount=m)
        h.check_eq([r[:2] for r in res], [("w", "EIO"), ("r", "EIO")], "the write and read, answered by the timeout")
        # Answered, they stop waiting for the reconnect (their buffers go back) at once.
        h.wait_until(lambda: h.live_stats(m.mountdir)["in_flight"]["answered_running"] == 0, timeout=3,
                     what="the answered requests to stop waiting for the reconnect")
        srv.start()
        h.wait_until(lambda: RECONNECTED_RE.search(m.stderr()), timeout=15, what="the reconnect")
        res = io_ops(m.export, ["r:0:65536", "f"], timeout=15, what="read and fsync after the reconnect", mount=m)
        h.check_eq([r[:2] for r in res], [("r", "OK:" + before), ("f", "OK")],
                   "the timed-out write's range after the reconnect")
        h.check_eq(file_sha(img, 0, 65536), before, "the timed-out write's range on the server")


def test_request_timeout():
    with h.Nbdkit(["memory", str(64 * MiB), "rdelay=3"], opts=["--filter=delay"]) as srv, \
            h.Mount(h.tmpdir("mp"), ["--unix", srv.sock], opts=["--request-timeout", "1"]) as m:
        res = io_ops(m.export, ["r:0:4096", "w:4096:4096", "f"], timeout=15,
                     what="read with a 3 s server delay", mount=m)
        h.check_eq([r[:2] for r in res], [("r", "EIO"), ("w", "OK"), ("f", "OK")],
                   "request timeout results")
        sec = res[0][2]
        h.check(0.8 <= sec <= 2.5, "read failed after %.2fs (expected 0.8-2.5 s)" % sec)
        # A write queued behind the read would wait for the server's answer to it, about 2 s
        # after the timeout: 1.5 s still tells that apart from a loaded machine's slowness.
        h.check(res[1][2] < 1.5, "write after the timed-out read took %.2fs (queued behind the read?)" % res[1][2])


# ---------------------------------------------------------------------------
# other targets: --tcp reconnects; --fd does not

def test_tcp_target_reconnects_pending_read():
    img = random_image(8 * MiB)
    srv = FixedTcpNbdkit(["file", img])
    with srv, h.Mount(h.tmpdir("mp"), ["--tcp", "127.0.0.1", str(srv.port)]) as m:
        res = io_ops(m.export, ["r:0:4096"], what="read before the kill", mount=m)
        h.check_eq(res[0][1], "OK:" + file_sha(img, 0, 4096), "read before the kill")
        srv.kill(signal.SIGKILL)
        srv.proc.wait(timeout=10)
        pending = start_io(m.export, ["r:%d:65536" % (5 * MiB)])
        wait_opened(pending)
        h.wait_until(lambda: LOST_RE.search(m.stderr()), timeout=10, what="'lost' line")
        h.check(pending.poll() is None, "read during the outage did not wait")
        srv.start()
        res = finish_io(pending, 10, "read pending across the restart", m)
        h.check_eq([r[:2] for r in res], [("r", "OK:" + file_sha(img, 5 * MiB, 65536))],
                   "read pending across a TCP server restart")
        h.check(RECONNECTED_RE.search(m.stderr()), "no 'reconnected' line: %s" % m.stderr()[-2000:])


def test_fd_target_not_reconnected():
    with h.Nbdkit(["memory", str(64 * MiB)]) as srv:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(srv.sock)
        fd = s.fileno()
        try:
            with h.Mount(h.tmpdir("mp"), ["--fd", str(fd)], pass_fds=(fd,),
                         after_start=s.close) as m:
                res = io_ops(m.export, ["w:0:4096"], what="write", mount=m)
                h.check_eq(res[0][1], "OK", "write before the kill")
                srv.kill(signal.SIGKILL)
                srv.proc.wait(timeout=10)
                res = io_ops(m.export, ["r:0:4096"], timeout=20, what="read after the kill", mount=m)
                h.check_eq(res[0][1], "EIO", "--fd target: read after the server died")
                h.check(res[0][2] < 5.0, "--fd target: read took %.2fs to fail (it must not wait "
                        "for a reconnect)" % res[0][2])
                text = m.stderr()
                h.check(NO_RECONNECT_RE.search(text) and "reconnecting" not in text,
                        "--fd target: expected 'lost ... fail with EIO' and no reconnecting: %s"
                        % text[-2000:])
        finally:
            s.close()


CRASH_ON_ONE_READ = r"""#!/bin/sh
# A server that dies on one read (at 1 MiB) and serves every other one (zeros).
case "$1" in
  get_size) echo 16M ;;
  can_write) exit 0 ;;
  pread)
    if [ "$4" = 1048576 ]; then kill -9 $PPID; exit 1; fi
    head -c "$3" /dev/zero ;;
  pwrite) cat >/dev/null ;;
  *) exit 2 ;;
esac
"""


def test_a_request_the_server_dies_on_each_time_is_not_replayed_for_ever():
    # A supervisor restarts the server whenever it dies, so every outage is short and the
    # pool never gives up; the read that kills it must still end (EIO) within about the
    # retry timeout of its first loss, and the mount stay usable.
    script = os.path.join(h.tmpdir("sh"), "crash.sh")
    with open(script, "w") as f:
        f.write(CRASH_ON_ONE_READ)
    os.chmod(script, 0o755)
    stop = threading.Event()
    restarts = [0]
    with h.Nbdkit(["sh", script]) as srv:
        def supervise():            # polls the server's state, as a supervisor does
            while not stop.wait(0.05):
                if srv.proc.poll() is not None:
                    kill_server_rm_sock(srv, already_dead=True)
                    srv.start()
                    restarts[0] += 1
        supervisor = threading.Thread(target=supervise, daemon=True)
        supervisor.start()
        try:
            with h.Mount(h.tmpdir("mp"), ["--unix", srv.sock], opts=["--retry-timeout", "3"]) as m:
                t0 = time.monotonic()
                r = h.run(["dd", "if=" + m.export, "of=/dev/null", "bs=4k", "count=1", "skip=256",
                           "iflag=direct"], timeout=30)
                took = time.monotonic() - t0
                h.check(r.returncode != 0 and "Input/output error" in r.stderr,
                        "the read the server dies on: rc %d, %s" % (r.returncode, r.stderr))
                h.check(took < 12, "it ended after %.1f s (retry timeout 3 s)" % took)
                h.check(restarts[0] >= 2, "the server died %d times" % restarts[0])
                r = h.run(["dd", "if=" + m.export, "of=/dev/null", "bs=4k", "count=1", "iflag=direct"],
                          timeout=15)
                h.check_eq(r.returncode, 0, "another read afterwards (%s)" % r.stderr)
        finally:
            stop.set()
            supervisor.join(timeout=10)


class DiesDuringMountProxy(h.Proxy):
    """Forwards the first connection; when the second arrives the server 'dies': the
    first is closed and every later one is closed at once."""

    def _serve(self, c, u):
        if self.nconn == 0:
            return super()._serve(c, u)
        if self.nconn == 1:
            self.close_one(0)
        with self._lock:
            self.nconn += 1
        for x in (c, u):
            x.close()


def test_a_server_lost_while_the_mount_is_made_is_bound_by_the_retry_timeout():
    # The server goes while the bridge opens its second connection: the mount comes up on
    # the first, already lost, which had no one to tell yet. Requests must fail with EIO
    # once --retry-timeout has passed, not wait for ever.
    with h.Nbdkit(["memory", "16M"]) as srv, DiesDuringMountProxy(srv.sock) as proxy, \
            h.Mount(h.tmpdir("mp"), [proxy.uri], opts=["-C", "2", "--retry-timeout", "2"]) as m:
        t0 = time.monotonic()
        r = h.run(["dd", "if=" + m.export, "of=/dev/null", "bs=4k", "count=1", "iflag=direct"], timeout=20)
        took = time.monotonic() - t0
        h.check(r.returncode != 0 and "Input/output error" in r.stderr, "read with the server gone: %s" % r.stderr)
        h.check(took < 8, "it failed after %.1f s (retry timeout 2 s)" % took)
        h.check(LOST_RE.search(m.stderr()), "no 'lost' line for the connection lost at mount: %s" % m.stderr())


if __name__ == "__main__":
    h.main(globals())
