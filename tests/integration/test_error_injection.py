#!/usr/bin/env python3
"""Error injection with nbdkit's error filter: under a fio random read/write
load a small share of requests fail with EIO, the rest succeed, the bridge
keeps serving (once injection stops every request succeeds again) and the
mount unmounts cleanly with exit status 0.  Injected ENOSPC / EPERM reach
the application as that errno.
"""
import errno
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import semantics_util as su  # noqa: E402

MiB = 1 << 20
SIZE = 256 * MiB
FIO_SIZE = 64 * MiB


def _io_loop(export, n, rnd):
    """n small write+read pairs; returns (ok, failures[(op, errno)])."""
    ok, failures = 0, []
    fd = os.open(export, os.O_RDWR)
    try:
        for _ in range(n):
            off = rnd.randrange(0, SIZE - 70000)
            data = rnd.randbytes(rnd.randrange(1, 70000))
            try:
                h.pwrite_full(fd, data, off)
            except OSError as e:
                failures.append(("write", e.errno))
                continue
            try:
                got = h.pread_full(fd, len(data), off)
            except OSError as e:
                failures.append(("read", e.errno))
                continue
            h.check_bytes(got, data, "read-after-write off=%d" % off)
            ok += 1
    finally:
        os.close(fd)
    return ok, failures


def test_eio_under_fio_load():
    d = h.tmpdir("inject")
    switch = os.path.join(d, "inject-on")     # errors only while this file exists
    open(switch, "w").close()
    args = ["memory", str(SIZE), "error=EIO", "error-rate=1%", "error-file=" + switch]
    with h.Nbdkit(args, opts=["--filter=error"]) as srv:
        with h.Mount(h.tmpdir("mp"), [srv.uri], expect_exit=0) as m:
            r, data = su.fio_json(m.export, [
                "--name=inject", "--size=%d" % FIO_SIZE, "--direct=1", "--ioengine=libaio",
                "--iodepth=32", "--rw=randrw", "--bs=4k", "--randseed=5",
                "--number_ios=12000", "--continue_on_error=all"], timeout=80)
            job = data["jobs"][0]
            ios = job["read"]["total_ios"] + job["write"]["total_ios"]
            errs = job.get("total_err", 0)
            h.check(ios >= 5000, "fio completed only %d I/Os (rc=%d, stderr %s)"
                    % (ios, r.returncode, r.stderr[-1000:]))
            h.check(errs > 0, "no I/O error reached fio with error-rate=1%% (%d I/Os)" % ios)
            h.check(errs < ios * 0.05, "too many errors: %d of %d I/Os" % (errs, ios))
            first = job.get("first_error", job.get("error"))
            h.check_eq(first, errno.EIO, "fio's first error (errno)")
            h.check("Input/output error" in r.stderr or "Input/output error" in r.stdout or
                    job.get("error") == errno.EIO, "fio did not report EIO: %r" % r.stderr[-500:])
            # with injection still on, plain I/O mostly succeeds
            ok, fails = _io_loop(m.export, 200, random.Random(1))
            h.check(ok >= 150, "only %d of 200 write+read pairs succeeded: %r" % (ok, fails[:10]))
            h.check(all(e == errno.EIO for _, e in fails), "unexpected errnos: %r" % fails)
            # injection off: the bridge is fully healthy again, nothing was lost
            os.unlink(switch)
            ok, fails = _io_loop(m.export, 300, random.Random(2))
            h.check_eq(fails, [], "failures after injection stopped")
            h.check_eq(ok, 300, "write+read pairs after injection stopped")
            h.check(m.proc.poll() is None, "nbdbridge exited under errors")
            h.check(m.mounted(), "mount disappeared under errors")
        h.check_eq(m.returncode, 0, "nbdbridge exit status after unmount")
        h.check(srv.proc.poll() is None, "nbdkit died")


def _errno_case(filter_args, op, expected):
    with h.Nbdkit(["memory", str(16 * MiB)] + filter_args, opts=["--filter=error"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDWR)
        try:
            if op == "write":
                e, _ = h.os_errno(os.pwrite, fd, b"z" * 4096, 8192)
            elif op == "read":
                e, _ = h.os_errno(os.pread, fd, 4096, 8192)
            else:
                e = su.fallocate(fd, su.FALLOC_FL_ZERO_RANGE, 0, 65536)
            h.check_eq(h.errno_name(e), h.errno_name(expected), "%s with %r" % (op, filter_args))
            # the other direction is unaffected
            if op == "write":
                h.check_bytes(os.pread(fd, 4096, 8192), bytes(4096), "read after refused write")
            else:
                h.check_eq(os.pwrite(fd, b"ok", 0), 2, "write while %s fails" % op)
        finally:
            os.close(fd)


def test_enospc_reaches_application():
    _errno_case(["error=ENOSPC", "error-pwrite-rate=100%"], "write", errno.ENOSPC)


def test_enospc_on_zero_reaches_application():
    _errno_case(["error=ENOSPC", "error-zero-rate=100%"], "zero", errno.ENOSPC)


def test_eperm_reaches_application():
    _errno_case(["error=EPERM", "error-pwrite-rate=100%"], "write", errno.EPERM)


def test_eio_on_read_reaches_application():
    _errno_case(["error=EIO", "error-pread-rate=100%"], "read", errno.EIO)


if __name__ == "__main__":
    h.main(globals())
