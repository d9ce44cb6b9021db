#!/usr/bin/env python3
"""Server-side errors reach the application with the server's errno.

An nbdkit sh plugin serves a 4 MiB disk backed by a local file and injects:
  * EIO    for reads and writes touching [EIO_OFF, EIO_OFF+EIO_LEN)
  * ENOSPC for writes touching           [NOSPC_OFF, NOSPC_OFF+NOSPC_LEN)
  * EPERM  for reads touching            [PERM_OFF, PERM_OFF+PERM_LEN)
  * EIO for flush once the file "$DIR/fail-flush" exists
Everything else must keep working, with the right data.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

SIZE = 4 * 1024 * 1024
EIO_OFF, EIO_LEN = 1 * 1024 * 1024, 64 * 1024
NOSPC_OFF, NOSPC_LEN = 2 * 1024 * 1024, 64 * 1024
PERM_OFF, PERM_LEN = 3 * 1024 * 1024, 64 * 1024

SCRIPT = r"""#!/bin/bash
disk=%(disk)s
dir=%(dir)s
overlaps() { # count offset start len
  [ $(( $2 < $3 + $4 && $3 < $2 + $1 )) -eq 1 ]
}
case "$1" in
  get_size) echo %(size)d ;;
  thread_model) echo parallel ;;
  can_write|can_flush) exit 0 ;;
  can_trim|can_zero|can_extents|can_multi_conn|is_rotational|can_fast_zero) exit 3 ;;
  can_fua|can_cache) echo none ;;
  pread)
    if overlaps "$3" "$4" %(eio_off)d %(eio_len)d; then
      echo "EIO injected read error" >&2; exit 1
    fi
    if overlaps "$3" "$4" %(perm_off)d %(perm_len)d; then
      echo "EPERM injected read error" >&2; exit 1
    fi
    exec dd if="$disk" bs=65536 iflag=skip_bytes,count_bytes,fullblock skip="$4" count="$3" status=none
    ;;
  pwrite)
    if overlaps "$3" "$4" %(eio_off)d %(eio_len)d; then
      cat >/dev/null; echo "EIO injected write error" >&2; exit 1
    fi
    if overlaps "$3" "$4" %(nospc_off)d %(nospc_len)d; then
      cat >/dev/null; echo "ENOSPC injected write error" >&2; exit 1
    fi
    if [ -e "$dir/slow-write" ]; then
      sleep 4.5
      dd of="$disk" bs=65536 iflag=count_bytes,fullblock oflag=seek_bytes conv=notrunc seek="$4" count="$3" status=none
      touch "$dir/slow-write-done"; exit 0
    fi
    exec dd of="$disk" bs=65536 iflag=count_bytes,fullblock oflag=seek_bytes conv=notrunc seek="$4" count="$3" status=none
    ;;
  flush)
    if [ -e "$dir/fail-flush" ]; then echo "EIO injected flush error" >&2; exit 1; fi
    exit 0
    ;;
  *) exit 2 ;;
esac
"""


class ErrServer(h.Nbdkit):
    def __init__(self):
        d = h.tmpdir("sh")
        self.disk = os.path.join(d, "disk")
        self.content = bytearray(os.urandom(SIZE))
        with open(self.disk, "wb") as f:
            f.write(self.content)
        script = os.path.join(d, "plugin.sh")
        with open(script, "w") as f:
            f.write(SCRIPT % dict(disk=self.disk, dir=d, size=SIZE,
                                  eio_off=EIO_OFF, eio_len=EIO_LEN,
                                  nospc_off=NOSPC_OFF, nospc_len=NOSPC_LEN,
                                  perm_off=PERM_OFF, perm_len=PERM_LEN))
        os.chmod(script, 0o755)
        self.flagdir = d
        super().__init__(["sh", script])

    def disk_bytes(self):
        with open(self.disk, "rb") as f:
            return f.read()


def _read(fd, off, n):
    return h.os_errno(os.pread, fd, n, off)


def test_read_errors_only_in_their_ranges():
    with ErrServer() as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDONLY)
        try:
            for off, n, want in [
                    (EIO_OFF, 4096, "EIO"),
                    (EIO_OFF + EIO_LEN - 4096, 4096, "EIO"),
                    (EIO_OFF + 100, 1, "EIO"),
                    (PERM_OFF, 4096, "EPERM"),
                    (PERM_OFF + 12345, 10, "EPERM"),
                    (NOSPC_OFF, 4096, "OK"),               # ENOSPC range is write-only
                    (EIO_OFF - 4096, 4096, "OK"),          # just before
                    (EIO_OFF + EIO_LEN, 4096, "OK"),       # just after
                    (PERM_OFF - 1, 1, "OK"),
                    (PERM_OFF + PERM_LEN, 1, "OK"),
                    (0, 65536, "OK")]:
                e, data = _read(fd, off, n)
                h.check_eq(h.errno_name(e), want, "pread(off=%d, len=%d) errno" % (off, n))
                if want == "OK":
                    h.check_bytes(data, bytes(srv.content[off:off + n]),
                                  "pread(off=%d,len=%d) data" % (off, n))
            # errors are per request: the connection still works afterwards
            e, data = _read(fd, 8192, 8192)
            h.check_eq(h.errno_name(e), "OK", "read after errors")
            h.check_bytes(data, bytes(srv.content[8192:16384]), "data after errors")
            # a tool sees the error too
            r = h.run(["dd", "if=" + m.export, "of=/dev/null", "bs=4096",
                       "skip=%d" % (EIO_OFF // 4096), "count=1"])
            h.check(r.returncode != 0, "dd over the EIO range succeeded")
            h.check("Input/output error" in r.stderr, "dd stderr lacks EIO: %r" % r.stderr)
        finally:
            os.close(fd)


def test_write_errors_only_in_their_ranges():
    with ErrServer() as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDWR)
        try:
            for off, n, want in [
                    (NOSPC_OFF, 4096, "ENOSPC"),
                    (NOSPC_OFF + NOSPC_LEN - 1, 1, "ENOSPC"),
                    (EIO_OFF, 4096, "EIO"),
                    (EIO_OFF + 4096 * 3, 512, "EIO"),
                    (NOSPC_OFF - 4096, 4096, "OK"),
                    (NOSPC_OFF + NOSPC_LEN, 4096, "OK"),
                    (EIO_OFF - 1, 1, "OK"),
                    (PERM_OFF, 4096, "OK"),            # EPERM range is read-only
                    (100, 1000, "OK")]:
                data = os.urandom(n)
                e, count = h.os_errno(os.pwrite, fd, data, off)
                h.check_eq(h.errno_name(e), want, "pwrite(off=%d, len=%d) errno" % (off, n))
                if want == "OK":
                    h.check_eq(count, n, "pwrite(off=%d, len=%d) count" % (off, n))
                    srv.content[off:off + n] = data
            os.fsync(fd)
        finally:
            os.close(fd)
        # Failed writes changed nothing; successful ones landed exactly.
        h.check_bytes(srv.disk_bytes(), bytes(srv.content), "backing disk after writes")


def test_flush_error_reaches_fsync():
    # A failed flush may have lost what it was to cover: as Linux reports a writeback
    # error to each open file, another file's fsync fails once too, though the flush it
    # sends works again; the file that got the error is not told twice.
    with ErrServer() as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDWR)
        other = os.open(m.export, os.O_RDWR)
        try:
            os.pwrite(fd, b"abc", 0)
            e, _ = h.os_errno(os.fsync, fd)
            h.check_eq(h.errno_name(e), "OK", "fsync with working flush")
            open(os.path.join(srv.flagdir, "fail-flush"), "w").close()
            os.pwrite(fd, b"def", 0)
            os.pwrite(other, b"ghi", 4096)
            e, _ = h.os_errno(os.fsync, fd)
            h.check_eq(h.errno_name(e), "EIO", "fsync when server flush fails")
            os.unlink(os.path.join(srv.flagdir, "fail-flush"))
            results = [h.errno_name(h.os_errno(os.fsync, f)[0]) for f in (fd, other, other)]
            h.check_eq(results, ["OK", "EIO", "OK"], "fsyncs after the flush works again: the failed one's "
                       "file, the other file twice")
        finally:
            os.close(other)
            os.close(fd)


def test_a_timed_out_write_does_not_undo_a_later_one():
    # A write answered EIO by --request-timeout cannot be recalled: the server still
    # carries it out (4.5 s after it came; the timeout answers it at 3-3.75 s). The
    # application writes the same place again and fsyncs; that write must land after the
    # late one, not be undone by it (it waits for it, within its own 3 s).
    with ErrServer() as srv, h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--request-timeout", "3"]) as m:
        slow = os.path.join(srv.flagdir, "slow-write")
        fd = os.open(m.export, os.O_RDWR)
        try:
            open(slow, "w").close()
            e, _ = h.os_errno(os.pwrite, fd, b"A" * 4096, 8192)
            h.check_eq(h.errno_name(e), "EIO", "the write the server holds past the request timeout")
            os.unlink(slow)
            h.check_eq(os.pwrite(fd, b"B" * 4096, 8192), 4096, "the write after it")
            e, _ = h.os_errno(os.fsync, fd)
            h.check_eq(h.errno_name(e), "OK", "fsync after the second write")
            h.wait_until(lambda: os.path.exists(slow + "-done"), timeout=10, what="the held write to be carried out")
            h.check_bytes(srv.disk_bytes()[8192:8192 + 4096], b"B" * 4096, "the server's bytes after both writes")
        finally:
            os.close(fd)


def test_errors_with_concurrent_good_io():
    # Errors in one request must not disturb other requests in flight.
    import threading
    with ErrServer() as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        problems = []

        def bad(i):
            fd = os.open(m.export, os.O_RDWR)
            try:
                for _ in range(10):
                    e, _ = _read(fd, EIO_OFF + 4096 * i, 4096)
                    if h.errno_name(e) != "EIO":
                        problems.append("bad reader %d got %s" % (i, h.errno_name(e)))
                    e, _ = h.os_errno(os.pwrite, fd, b"z" * 4096, NOSPC_OFF + 4096 * i)
                    if h.errno_name(e) != "ENOSPC":
                        problems.append("bad writer %d got %s" % (i, h.errno_name(e)))
            finally:
                os.close(fd)

        def good(i):
            fd = os.open(m.export, os.O_RDONLY)
            try:
                for k in range(10):
                    off = 16384 * (i * 10 + k)        # all below EIO_OFF
                    e, data = _read(fd, off, 4096)
                    if e or data != bytes(srv.content[off:off + 4096]):
                        problems.append("good reader %d at %d: %s" % (i, off, h.errno_name(e)))
            finally:
                os.close(fd)

        finished = []

        def counted(body, i):
            # Any exception (an os.open failing, say) is a problem, not a silent thread end.
            try:
                body(i)
                finished.append(i)
            except Exception as e:  # noqa: BLE001
                problems.append("%s %d raised %r" % (body.__name__, i, e))

        threads = [threading.Thread(target=counted, args=(bad, i), daemon=True) for i in range(3)]
        threads += [threading.Thread(target=counted, args=(good, i), daemon=True) for i in range(3)]
        for t in threads:
            t.start()
        end = time.monotonic() + 50          # one deadline for all
        for t in threads:
            t.join(timeout=max(0.0, end - time.monotonic()))
        h.check(not any(t.is_alive() for t in threads), "I/O threads hung")
        h.check(not problems, "; ".join(problems[:10]))
        h.check_eq(len(finished), 6, "threads that did all their I/O")


if __name__ == "__main__":
    h.main(globals())
