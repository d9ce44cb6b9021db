#!/usr/bin/env python3
"""Read-ahead under --cache=none: a file read sequentially in small buffered pieces is
answered from windows fetched ahead, with the right bytes; O_DIRECT reads and
--read-ahead off never are; this mount's writes are seen at once, other clients'
within the freshness bound; a window the server failed leaves every read its own answer.
"""
import mmap
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import semantics_util as su  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
SIZE = 16 * MiB + 1003   # the last piece is short: windows stop at the end
FRESHNESS = 0.1          # seconds: how old data a window may answer with (bridge/read_ahead.hpp)


def _read_ahead(m):
    # The mount shows in /proc/mounts before the bridge has read the kernel's INIT; the
    # control socket is there once a request to the file can be answered.
    os.stat(m.export)
    return h.live_stats(m.mountdir)["read_ahead"]


def _read_sequentially(fd, start, end, piece):
    data = bytearray()
    offset = start
    while offset < end:
        got = os.pread(fd, min(piece, end - offset), offset)
        h.check(got, "pread at %d returned nothing before the end" % offset)
        data += got
        offset += len(got)
    return bytes(data)


def test_sequential_small_reads_are_answered_ahead():
    with h.Nbdkit(["pattern", str(SIZE)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        for piece in (512, 4 * KiB, 32 * KiB + 512):
            before = _read_ahead(m)
            fd = os.open(m.export, os.O_RDONLY)
            try:
                start = 4 * MiB - 1000 if piece == 512 else 0   # unaligned, then to the very end
                h.check_bytes(_read_sequentially(fd, start, SIZE, piece), h.pattern_bytes(start, SIZE - start, SIZE),
                              "%d-byte sequential reads from %d" % (piece, start))
            finally:
                os.close(fd)
            after = _read_ahead(m)
            reads = -(-(SIZE - start) // piece)
            answered = after["reads_answered"] - before["reads_answered"]
            h.check(answered >= reads * 3 // 4, "%d-byte reads: %d of %d answered from read-ahead windows (%r)"
                    % (piece, answered, reads, after))
            h.check_eq(after["failed_windows"], 0, "failed read-ahead windows")


def test_o_direct_and_large_reads_and_off_are_never_read_ahead():
    with h.Nbdkit(["pattern", str(SIZE)]) as srv:
        with h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
            fd = os.open(m.export, os.O_RDONLY | os.O_DIRECT)
            try:
                h.check_bytes(_direct_reads(fd, 0, 2 * MiB, 4 * KiB),
                              h.pattern_bytes(0, 2 * MiB, SIZE), "O_DIRECT sequential reads")
            finally:
                os.close(fd)
            fd = os.open(m.export, os.O_RDONLY)
            try:
                _read_sequentially(fd, 0, 8 * MiB, 256 * KiB)   # larger than read-ahead takes
            finally:
                os.close(fd)
            stats = _read_ahead(m)
            h.check_eq((stats["windows"], stats["reads_answered"]), (0, 0), "read-ahead of O_DIRECT or 256 KiB reads")
        with h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--read-ahead", "off"]) as m:
            fd = os.open(m.export, os.O_RDONLY)
            try:
                h.check_bytes(_read_sequentially(fd, 0, 2 * MiB, 4 * KiB), h.pattern_bytes(0, 2 * MiB, SIZE),
                              "4 KiB reads with --read-ahead off")
            finally:
                os.close(fd)
            stats = _read_ahead(m)
            h.check_eq((stats["windows"], stats["reads_answered"]), (0, 0), "read-ahead with --read-ahead off")


def _direct_reads(fd, start, end, piece):
    buffer = mmap.mmap(-1, piece)   # page-aligned, as O_DIRECT wants
    data = bytearray()
    for offset in range(start, end, piece):
        got = os.preadv(fd, [buffer], offset)
        h.check_eq(got, piece, "O_DIRECT pread at %d" % offset)
        data += buffer[:got]
    return bytes(data)


def _start_window(m, fd):
    """Three sequential 4 KiB reads from 0 start a window at 12 KiB; returns once it is in."""
    before = _read_ahead(m)["windows"]
    _read_sequentially(fd, 0, 12 * KiB, 4 * KiB)
    h.wait_until(lambda: _read_ahead(m)["windows"] > before, what="the read-ahead window to be fetched")


def test_this_mounts_writes_are_seen_at_once():
    with h.Nbdkit(["memory", str(4 * MiB)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        reader = os.open(m.export, os.O_RDONLY)
        writer = os.open(m.export, os.O_WRONLY)
        try:
            _start_window(m, reader)
            before = _read_ahead(m)["reads_answered"]
            h.check_bytes(_read_sequentially(reader, 12 * KiB, 64 * KiB, 4 * KiB), bytes(52 * KiB), "zeros")
            h.check(_read_ahead(m)["reads_answered"] > before, "the window answered none of the reads before the write")
            h.check_eq(os.pwrite(writer, b"\xab" * 4096, 64 * KiB), 4096, "pwrite")
            h.check_bytes(_read_sequentially(reader, 64 * KiB, 72 * KiB, 4 * KiB),
                          b"\xab" * 4096 + bytes(4096), "the reader's view of the write it read ahead of")
        finally:
            os.close(reader)
            os.close(writer)


def test_other_clients_writes_are_seen_once_the_window_is_old():
    with h.Nbdkit(["memory", str(4 * MiB)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        reader = os.open(m.export, os.O_RDONLY)
        try:
            _start_window(m, reader)
            fetched = time.monotonic()   # (later than the fetch was sent)
            r = h.run(["qemu-io", "-f", "raw", "-c", "write -P 0xcd %d 4096" % (64 * KiB),
                       "nbd+unix:///?socket=" + srv.sock], timeout=30)
            h.check_eq(r.returncode, 0, "qemu-io write (%s)" % r.stderr.strip())
            # The property under test is an age: the window the reader is in may answer
            # with data up to FRESHNESS old, and no older.
            h.wait_until(lambda: time.monotonic() > fetched + 2 * FRESHNESS, what="the window to age")
            got = _read_sequentially(reader, 12 * KiB, 72 * KiB, 4 * KiB)
            h.check_bytes(got[52 * KiB:], b"\xcd" * 4096 + bytes(4096), "another client's write, read after it")
        finally:
            os.close(reader)


def test_a_write_that_ends_while_a_window_is_fetched_is_seen():
    """The write is held by the server (delay filter) while the reader's window is
    fetched: the window may hold the old data, so it must not answer once the write is done."""
    with h.Nbdkit(["memory", str(4 * MiB), "wdelay=1"], opts=["--filter=delay"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        reader = os.open(m.export, os.O_RDONLY)
        try:
            writer = h.popen([sys.executable, "-c", "import os,sys\nfd=os.open(sys.argv[1],os.O_WRONLY)\n"
                              "os.pwrite(fd,b'\\xab'*4096,65536)\nos.close(fd)\n", m.export])
            h.wait_until(lambda: h.live_stats(m.mountdir)["operations"]["write"]["in_flight"] == 1,
                         what="the write to be in flight")
            _start_window(m, reader)
            h.check_eq(h.live_stats(m.mountdir)["operations"]["write"]["in_flight"], 1,
                       "the write in flight once the window was in (else this tests no race)")
            h.check(writer.wait(timeout=30) == 0, "the writer failed")
            h.check_bytes(_read_sequentially(reader, 12 * KiB, 72 * KiB, 4 * KiB)[52 * KiB:],
                          b"\xab" * 4096 + bytes(4096), "the block written while the window was fetched")
        finally:
            os.close(reader)


def test_writes_elsewhere_leave_the_window():
    """A reader's windows are not lost to writes to other parts of the export (a database
    scanning while it logs): most of its reads are still answered ahead."""
    with h.Nbdkit(["pattern", str(16 * MiB)], opts=["--filter=cow"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        reader = os.open(m.export, os.O_RDONLY)
        writer = os.open(m.export, os.O_WRONLY)
        try:
            before = _read_ahead(m)["reads_answered"]
            for offset in range(0, 4 * MiB, 4 * KiB):
                h.check_bytes(os.pread(reader, 4 * KiB, offset), h.pattern_bytes(offset, 4 * KiB, 16 * MiB),
                              "read at %d" % offset)
                os.pwrite(writer, b"\x5a" * 4096, 8 * MiB + offset)
            stats = _read_ahead(m)
            answered = stats["reads_answered"] - before
            h.check(answered >= 1024 * 3 // 4, "%d of 1024 reads answered ahead among writes elsewhere (%r)"
                    % (answered, stats))
        finally:
            os.close(reader)
            os.close(writer)


def test_a_reader_writing_back_what_it_read_keeps_its_windows():
    """`dd if=X of=X conv=notrunc` in place, a program rewriting each record it reads: the
    write just behind the reader leaves the rest of the window in use."""
    with h.Nbdkit(["pattern", str(16 * MiB)], opts=["--filter=cow"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDWR)
        try:
            before = _read_ahead(m)["reads_answered"]
            for offset in range(0, 4 * MiB, 4 * KiB):
                data = os.pread(fd, 4 * KiB, offset)
                h.check_bytes(data, h.pattern_bytes(offset, 4 * KiB, 16 * MiB), "read at %d" % offset)
                h.check_eq(os.pwrite(fd, data, offset), 4 * KiB, "pwrite at %d" % offset)
            stats = _read_ahead(m)
            answered = stats["reads_answered"] - before
            h.check(answered >= 1024 * 3 // 4, "%d of 1024 reads answered ahead, each written back (%r)"
                    % (answered, stats))
        finally:
            os.close(fd)


def test_a_server_slower_than_the_freshness_gets_no_fetch_per_read():
    """A window that takes longer than 0.1 s comes back stale: it is not sent again for
    every READ meanwhile, nor again once it came back stale."""
    with h.Nbdkit(["pattern", str(SIZE), "rdelay=150ms"], opts=["--filter=delay"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDONLY)
        try:
            h.check_bytes(_read_sequentially(fd, 0, 48 * KiB, 4 * KiB), h.pattern_bytes(0, 48 * KiB, SIZE),
                          "reads from a slow server")
        finally:
            os.close(fd)
        stats = _read_ahead(m)
        h.check(stats["windows"] + stats["failed_windows"] <= 2 and stats["reads_answered"] == 0,
                "read-ahead for 12 READs from a server answering in 150 ms: %r" % stats)


def test_a_slow_reader_is_not_read_ahead():
    """A 4 KiB reader every 80 ms would use a window once before it went stale: no
    window is fetched for it (fetched for each READ, one would cost 1 MiB per READ)."""
    with h.Nbdkit(["pattern", str(SIZE)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDONLY)
        try:
            for offset in range(0, 12 * 4 * KiB, 4 * KiB):
                pace = time.monotonic() + 0.08   # the workload's pace, not a synchronisation
                h.check_bytes(os.pread(fd, 4 * KiB, offset), h.pattern_bytes(offset, 4 * KiB, SIZE),
                              "read at %d" % offset)
                h.wait_until(lambda: time.monotonic() >= pace, what="the reader's pace")
        finally:
            os.close(fd)
        stats = _read_ahead(m)
        h.check_eq(stats["windows"], 0, "read-ahead windows for a slow reader (%r)" % stats)


# The first 4 MiB of zeros but for 4 KiB at 1 MiB, whose reads fail with EIO.
SH_SCRIPT = r"""#!/bin/sh
case "$1" in
  get_size) echo 4194304 ;;
  thread_model) echo parallel ;;
  can_write|can_trim|can_zero|can_extents|can_multi_conn|can_flush|can_fast_zero) exit 3 ;;
  pread)
    if [ "$4" -lt 1052672 ] && [ $(($4 + $3)) -gt 1048576 ]; then echo "EIO injected" >&2; exit 1; fi
    head -c "$3" /dev/zero ;;
  *) exit 2 ;;
esac
"""


def _sh_plugin(text):
    script = os.path.join(h.tmpdir("sh"), "plugin.sh")
    with open(script, "w") as f:
        f.write(text)
    os.chmod(script, 0o755)
    return script


def test_a_failed_window_leaves_each_read_its_own_answer():
    with h.Nbdkit(["sh", _sh_plugin(SH_SCRIPT)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDONLY)
        try:
            offset = 0
            while offset < 1 * MiB:
                h.check_bytes(os.pread(fd, 4096, offset), bytes(4096), "read at %d" % offset)
                offset += 4096
            e, _ = h.os_errno(os.pread, fd, 4096, 1 * MiB)
            h.check_eq(h.errno_name(e), "EIO", "the read of the failing block")
            for offset in range(1 * MiB + 4096, 2 * MiB, 4096):
                h.check_bytes(os.pread(fd, 4096, offset), bytes(4096), "read at %d" % offset)
        finally:
            os.close(fd)
        stats = _read_ahead(m)
        # Once failed, a range is not fetched again: one bad block costs one window, not one per READ.
        h.check(1 <= stats["failed_windows"] <= 2, "read-ahead windows failed over one bad block: %r" % stats)
        h.check(stats["reads_answered"] > 0, "no read answered from a window: %r" % stats)


# Zeros, but a READ of more than 4 KiB (a read-ahead fetch, here) takes half a second.
SLOW_SH_SCRIPT = r"""#!/bin/sh
case "$1" in
  get_size) echo 4194304 ;;
  thread_model) echo parallel ;;
  can_write|can_trim|can_zero|can_extents|can_multi_conn|can_flush|can_fast_zero) exit 3 ;;
  pread) if [ "$3" -gt 4096 ]; then sleep 0.5; fi; head -c "$3" /dev/zero ;;
  *) exit 2 ;;
esac
"""


def test_a_stop_waits_for_a_fetch_in_flight():
    """A window still being fetched at unmount is waited for (within --shutdown-timeout):
    closing the connection under it would leave the server its reply to a closed socket."""
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with h.Nbdkit(["sh", _sh_plugin(SLOW_SH_SCRIPT), "logfile=" + logfile], opts=["--filter=log"]) as srv:
        with h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
            fd = os.open(m.export, os.O_RDONLY)
            try:
                _read_sequentially(fd, 0, 16 * KiB, 4 * KiB)
                h.wait_until(lambda: [r for r in su.log_requests(logfile)
                                      if r["act"] == "Read" and r["count"] > 4 * KiB],
                             what="the window's fetch to reach the server")
            finally:
                os.close(fd)
        fetch = [r for r in su.log_requests(logfile) if r["act"] == "Read" and r["count"] > 4 * KiB][0]
        # The server logs a connection's end once its requests are done and replied to (or not).
        h.wait_until(lambda: any("connection=%d Disconnect" % fetch["conn"] in line
                                 for line in su.read_log(logfile)), what="the server to end the fetch's connection")
        # ("sending newstyle handshake: Broken pipe" is the harness's probe for the socket.)
        h.check("write reply" not in srv.stderr(), "the server's log after the stop: %s" % srv.stderr()[-2000:])
        h.check_eq(m.returncode, 0, "exit status")


if __name__ == "__main__":
    h.main(globals())
