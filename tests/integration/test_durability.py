#!/usr/bin/env python3
"""Durability: fsync/fdatasync/close send NBD_CMD_FLUSH, O_DSYNC/O_SYNC writes
carry FUA (or are followed by a flush when the server has no FUA), and a
server without flush support is reported once and fsync still succeeds.
The nbdkit log filter (first in the chain, so it sees the client's own
requests) is the witness.
"""
import contextlib
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import semantics_util as su  # noqa: E402

SIZE = 8 * 1024 * 1024
MiB = 1024 * 1024


def _logged_server(logfile, extra_filters=(), size=SIZE, extra_args=()):
    return h.Nbdkit(["memory", str(size), "logfile=" + logfile] + list(extra_args),
                    opts=["--filter=log"] + list(extra_filters))


def _new_requests(logfile, before):
    return su.log_requests(logfile)[before:]


def test_fsync_fdatasync_flush():
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with _logged_server(logfile) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDWR)
        try:
            n0 = len(su.log_requests(logfile))
            os.pwrite(fd, b"durable", 4096)
            new = _new_requests(logfile, n0)
            h.check([r for r in new if r["act"] == "Write"], "write not logged")
            h.check(not [r for r in new if r["act"] == "Flush"], "plain write sent a flush: %r"
                    % [r["line"] for r in new])
            h.check(all(r.get("fua") == "0" for r in new if r["act"] == "Write"),
                    "plain write carried FUA: %r" % [r["line"] for r in new])
            for name, fn in (("fsync", os.fsync), ("fdatasync", os.fdatasync)):
                n1 = len(su.log_requests(logfile))
                fn(fd)
                # fsync returns only after the flush reply, so it is logged already
                flushes = [r for r in _new_requests(logfile, n1) if r["act"] == "Flush"]
                h.check(flushes, "%s sent no NBD flush" % name)
        finally:
            os.close(fd)
        img = su.server_image(srv.uri)
        h.check_bytes(img[4096:4103], b"durable", "fsynced data on the server")


def test_close_after_write_flushes():
    """README: close() after writing sends NBD_CMD_FLUSH; a reader's close does not."""
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with _logged_server(logfile) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        n0 = len(su.log_requests(logfile))
        with open(m.export, "rb") as f:
            f.read(4096)
        h.check(not [r for r in _new_requests(logfile, n0) if r["act"] == "Flush"],
                "closing a read-only descriptor sent a flush")
        fd = os.open(m.export, os.O_RDWR)
        try:
            os.pwrite(fd, b"closing", 8192)
            n1 = len(su.log_requests(logfile))
        finally:
            os.close(fd)
        # (allow for a kernel that sends FLUSH without waiting in close)
        try:
            h.wait_until(lambda: [r for r in _new_requests(logfile, n1) if r["act"] == "Flush"],
                         timeout=3, what="NBD flush after close")
        except h.TestFailure:
            raise h.TestFailure("close() after a write sent no NBD flush within 3 s "
                                "(requests after the write: %r)"
                                % [r["line"] for r in _new_requests(logfile, n1)])
        img = su.server_image(srv.uri)
        h.check_bytes(img[8192:8199], b"closing", "written data on the server")
        # Nothing left to make durable: a writer's close after fsync, or with no write,
        # sends no flush (the write is covered already).
        fd = os.open(m.export, os.O_RDWR)
        try:
            os.pwrite(fd, b"synced", 12288)
            os.fsync(fd)
            n2 = len(su.log_requests(logfile))
        finally:
            os.close(fd)
        fd = os.open(m.export, os.O_RDWR)
        os.close(fd)
        # A last write and close, which flushes: the only flush after n2 must be its.
        fd = os.open(m.export, os.O_RDWR)
        try:
            os.pwrite(fd, b"last", 16384)
        finally:
            os.close(fd)
        flushes = lambda: [r for r in _new_requests(logfile, n2) if r["act"] == "Flush"]  # noqa: E731
        h.wait_until(flushes, timeout=3, what="NBD flush after the last close")
        h.check_eq(len(flushes()), 1, "flushes after the fsync (a close with every write flushed already "
                   "sent one?): %r" % [r["line"] for r in _new_requests(logfile, n2)])


HOLDER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.pwrite(fd, b"held open", int(sys.argv[2]))
print("written", flush=True)
sys.stdin.read()  # holds the descriptor until the test closes our stdin
"""


@contextlib.contextmanager
def _holder(path, offset):
    """A process that writes at offset and keeps the file open until the block ends."""
    holder = h.popen([sys.executable, "-c", HOLDER, path, str(offset)], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, text=True)
    try:
        selector = selectors.DefaultSelector()
        selector.register(holder.stdout, selectors.EVENT_READ)
        h.check(selector.select(20), "the holder wrote nothing within 20 s")
        h.check_eq(holder.stdout.readline().strip(), "written", "the holder's first line")
        yield holder
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=10)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait(timeout=10)


def _stop_and_check_flushed(m, logfile, before):
    m.signal(signal.SIGTERM)
    h.check_eq(m.wait_exit(), 0, "nbdbridge exit status (stderr: %s)" % m.stderr()[-1500:])
    flushes = [r for r in _new_requests(logfile, before) if r["act"] == "Flush"]
    h.check(flushes, "no NBD flush between the write and the disconnect: %r"
            % [r["line"] for r in _new_requests(logfile, before)])
    h.check("may not be durable" not in m.stderr(), "stderr: %s" % m.stderr()[-1500:])


def test_stop_flushes_writes_of_a_file_still_open():
    """A process that holds the file open when the bridge is stopped sends no close's
    flush: the bridge sends one before it disconnects."""
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    stats_file = os.path.join(h.tmpdir("stats"), "stats.json")
    with _logged_server(logfile) as srv, h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--stats-file", stats_file]) as m, \
            _holder(m.export, 20480):
        writes = [r for r in su.log_requests(logfile) if r["act"] == "Write" and r.get("offset") == 20480]
        h.check(writes, "the holder's write is not in the server's log")
        _stop_and_check_flushed(m, logfile, len(su.log_requests(logfile)))
    with open(stats_file) as f:
        flush = json.load(f)["operations"]["flush"]
    h.check_eq((flush["count"], flush["errors"]), (1, 0), "the flush at stop in the statistics")


def test_stop_flushes_though_a_read_is_held_by_the_server():
    """A read the server still holds (its reader killed) does not cost the writes
    their flush at stop."""
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with _logged_server(logfile, ["--filter=delay"], extra_args=["delay-read=60"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--shutdown-timeout", "1"]) as m, _holder(m.export, 24576):
        reader = h.popen(["dd", "if=" + m.export, "of=/dev/null", "bs=4096", "count=1", "iflag=direct"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        h.wait_until(lambda: [r for r in su.log_requests(logfile) if r["act"] == "Read"], what="the read to reach "
                     "the server")
        reader.kill()
        reader.wait(timeout=10)
        _stop_and_check_flushed(m, logfile, len(su.log_requests(logfile)))


def test_stop_flushes_though_a_write_is_held_by_the_server():
    """A write still in flight (a punch-hole the server holds) does not cost the
    writes acknowledged before it their flush at stop: the flush covers those."""
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with _logged_server(logfile, ["--filter=delay"], extra_args=["delay-zero=60"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--shutdown-timeout", "1"]) as m, _holder(m.export, 32768):
        puncher = h.popen(["fallocate", "--punch-hole", "--offset", str(MiB), "--length", "65536", m.export],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            h.wait_until(lambda: [r for r in su.log_requests(logfile) if r["act"] == "Zero"],
                         what="the punch-hole to reach the server")
            _stop_and_check_flushed(m, logfile, len(su.log_requests(logfile)))
            h.check(puncher.wait(timeout=10) != 0, "the punch-hole the server held succeeded")
        finally:
            if puncher.poll() is None:
                puncher.kill()
                puncher.wait(timeout=10)


def test_stop_during_an_outage_is_prompt_and_says_what_was_not_flushed():
    """With the server gone, the flush at stop is not waited for (no reconnect), and
    stderr says the writes may not be durable, and the exit status is 1."""
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with _logged_server(logfile) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--retry-timeout", "30"], expect_exit=1) as m, \
            _holder(m.export, 28672):
        srv.kill(signal.SIGKILL)
        srv.proc.wait(timeout=10)
        h.wait_until(lambda: "lost" in m.stderr(), what="the bridge to notice the server is gone")
        t0 = time.monotonic()
        m.signal(signal.SIGTERM)
        h.check_eq(m.wait_exit(), 1, "nbdbridge exit status (stderr: %s)" % m.stderr()[-1500:])
        h.check(time.monotonic() - t0 < 3.0, "the stop took %.1f s during an outage" % (time.monotonic() - t0))
        h.check("may not be durable" in m.stderr(), "no word of the unflushed writes: %s" % m.stderr()[-1500:])


def _sync_write_case(flag, flagname, fua_server):
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    extra = [] if fua_server else ["--filter=fua"]   # fua filter default: FUA not advertised
    with _logged_server(logfile, extra) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        conn = su.log_connects(logfile)
        h.check(conn, "no Connect in the log")
        want_fua = "2" if fua_server else "0"
        h.check(all(c.get("fua") == want_fua for c in conn.values()),
                "server FUA advertisement not as set up: %r" % conn)
        data = os.urandom(65536 + 123)
        fd = os.open(m.export, os.O_RDWR | flag)
        try:
            n0 = len(su.log_requests(logfile))
            h.pwrite_full(fd, data, 12345)
            new = _new_requests(logfile, n0)
        finally:
            os.close(fd)
        writes = [r for r in new if r["act"] == "Write"]
        h.check(writes, "%s write not logged" % flagname)
        covered = sum(r["count"] for r in writes)
        h.check_eq(covered, len(data), "%s: bytes written to the server" % flagname)
        if fua_server:
            bad = [r["line"] for r in writes if r.get("fua") != "1"]
            h.check(not bad, "%s write without fua=1 on a FUA server: %r" % (flagname, bad))
        else:
            last_write = max(i for i, r in enumerate(new) if r["act"] == "Write")
            flush_after = [r for r in new[last_write + 1:] if r["act"] == "Flush"]
            h.check(flush_after, "%s write on a server without FUA was not followed by a flush "
                    "before the write returned: %r" % (flagname, [r["line"] for r in new]))
        with open(m.export, "rb") as f:
            f.seek(12345)
            h.check_bytes(f.read(len(data)), data, "%s data read back" % flagname)
        h.check_bytes(su.server_image(srv.uri)[12345:12345 + len(data)], data,
                      "%s data on the server" % flagname)


def test_odsync_write_uses_fua():
    _sync_write_case(os.O_DSYNC, "O_DSYNC", True)


def test_osync_write_uses_fua():
    _sync_write_case(os.O_SYNC, "O_SYNC", True)


def test_odsync_without_fua_flushes():
    _sync_write_case(os.O_DSYNC, "O_DSYNC", False)


def test_osync_without_fua_flushes():
    _sync_write_case(os.O_SYNC, "O_SYNC", False)


def test_server_without_flush():
    """nbdkit eval with pread/pwrite but no flush method: can_flush is false."""
    d = h.tmpdir("noflush")
    back = os.path.join(d, "back.img")
    size = 4 * 1024 * 1024
    with open(back, "wb") as f:
        f.truncate(size)
    args = ["eval", "get_size=echo %d" % size,
            "pread=exec dd if=%s skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none" % back,
            "pwrite=exec dd of=%s seek=$4 conv=notrunc oflag=seek_bytes status=none" % back,
            "can_write=exit 0"]
    logfile = os.path.join(d, "nbdkit.log")
    rnd = random.Random(5)
    with h.Nbdkit(args + ["logfile=" + logfile], opts=["--filter=log"]) as srv:
        with h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
            conn = su.log_connects(logfile)
            h.check(conn and all(c.get("flush") == "0" for c in conn.values()),
                    "test server should not advertise flush: %r" % conn)
            data = rnd.randbytes(20000)
            fd = os.open(m.export, os.O_RDWR)
            try:
                h.pwrite_full(fd, data, 1000)
                os.fsync(fd)          # must succeed (nothing to send)
                os.fdatasync(fd)
                os.pwrite(fd, b"x", 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            fd = os.open(m.export, os.O_RDWR | os.O_DSYNC)
            try:
                h.pwrite_full(fd, b"sync" * 100, 50000)   # O_DSYNC write works too
            finally:
                os.close(fd)
            h.check_eq(su.count_acts(logfile, "Flush"), 0, "flushes sent to a server without flush")
            fails = su.log_failed_replies(logfile)
            h.check(not fails, "server saw failed requests: %r" % fails[:5])
            err = m.stderr()
            notes = [ln for ln in err.splitlines() if "flush" in ln.lower()]
            h.check_eq(len(notes), 1, "lines on stderr about missing flush support (stderr: %r)" % err)
            h.check("not support flush" in notes[0], "note text: %r" % notes[0])
        with open(back, "rb") as f:
            img = f.read()
        h.check_bytes(img[1000:21000], data, "data in the server's backing file")
        h.check_bytes(img[50000:50400], b"sync" * 100, "O_DSYNC data in the backing file")
        h.check_bytes(img[0:1], b"x", "first byte in the backing file")
        # the note is said once per mount, not per fsync: stderr unchanged after unmount
        h.check_eq(len([ln for ln in m.stderr().splitlines() if "flush" in ln.lower()]), 1,
                   "notes about flush after unmount")


def test_flush_server_gets_no_note():
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        with h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
            fd = os.open(m.export, os.O_RDWR)
            try:
                os.pwrite(fd, b"a", 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        # (The statistics summary at exit counts flushes; only the note is wrong here.)
        notes = [line for line in m.stderr().lower().splitlines() if "stats" not in line]
        h.check(not any("flush" in line for line in notes),
                "stderr mentions flush for a server that supports it: %r" % m.stderr())


if __name__ == "__main__":
    h.main(globals())
