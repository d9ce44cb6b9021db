#!/usr/bin/env python3
"""fio with data verification through the mount (O_DIRECT, iodepth 64)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import semantics_util as su  # noqa: E402

EXPORT_SIZE = 64 * 1024 * 1024
FIO_SIZE = 32 * 1024 * 1024


def _fio(export, extra, timeout=45, size=FIO_SIZE):
    d = h.tmpdir("fio")
    out = os.path.join(d, "fio.json")
    cmd = ["fio", "--output-format=json", "--output=" + out,
           "--name=verify", "--filename=" + export, "--size=%d" % size,
           "--direct=1", "--iodepth=64", "--numjobs=1", "--thread",
           "--allow_file_create=0", "--fallocate=none", "--invalidate=0",
           "--randseed=4242", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
           "--exitall_on_error=1", "--verify_state_save=0"] + extra
    r = h.run(cmd, timeout=timeout, cwd=d)     # fio may drop state files in cwd
    try:
        with open(out) as f:
            text = f.read()
        # fio may print non-JSON notes before the JSON document
        data = json.loads(text[text.index("{"):])
    except (OSError, ValueError) as e:
        raise h.TestFailure("fio produced no JSON (rc=%d): %s\nstderr: %s\nstdout: %s"
                            % (r.returncode, e, r.stderr, r.stdout))
    return r, data


def _check_fio(r, data, min_write=FIO_SIZE, min_read=FIO_SIZE, what="fio"):
    h.check_eq(r.returncode, 0, "%s exit status (stderr: %s)" % (what, r.stderr.strip()[-2000:]))
    jobs = data.get("jobs", [])
    h.check(jobs, "%s: no jobs in JSON" % what)
    for job in jobs:
        h.check_eq(job.get("error"), 0, "%s job %s error" % (what, job.get("jobname")))
        wb = job["write"]["io_bytes"]
        rb = job["read"]["io_bytes"]
        h.check(wb >= min_write, "%s: wrote only %d bytes (expected >= %d)" % (what, wb, min_write))
        h.check(rb >= min_read, "%s: verify read only %d bytes (expected >= %d)" % (what, rb, min_read))
        for k in ("total_err",):
            if k in job:
                h.check_eq(job[k], 0, "%s %s" % (what, k))


def _io_uring_available():
    d = h.tmpdir("uring")
    p = os.path.join(d, "f")
    with open(p, "wb") as f:
        f.truncate(1 << 20)
    r = h.run(["fio", "--name=probe", "--verify_state_save=0", "--filename=" + p, "--size=1M", "--rw=read",
               "--bs=4k", "--ioengine=io_uring", "--iodepth=4", "--output-format=json"],
              timeout=30)
    return r.returncode == 0


def test_randwrite_verify_libaio_qd64():
    with h.Nbdkit(["memory", str(EXPORT_SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        r, data = _fio(m.export, ["--ioengine=libaio", "--rw=randwrite", "--bs=4k"])
        _check_fio(r, data, what="fio libaio randwrite 4k")


def test_randwrite_verify_io_uring_mixed_bs():
    if not _io_uring_available():
        raise h.SkipTest("io_uring not usable on this machine")
    with h.Nbdkit(["memory", str(EXPORT_SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        r, data = _fio(m.export, ["--ioengine=io_uring", "--rw=randwrite",
                                  "--bsrange=4k-256k", "--bs_unaligned=0"])
        _check_fio(r, data, what="fio io_uring randwrite 4k-256k")


def test_seqwrite_large_blocks_then_verify_on_fresh_mount():
    # 1 MiB requests (larger than FUSE's max request: split by the kernel).
    # The verify pass runs again on a *fresh* mount of the same server, so
    # the data must really have reached the server.
    with h.Nbdkit(["memory", str(EXPORT_SIZE)]) as srv:
        common = ["--ioengine=libaio", "--rw=write", "--bs=1M"]
        with h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
            r, data = _fio(m.export, common)
            _check_fio(r, data, what="fio seq write 1M")
        with h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
            r, data = _fio(m.export, common + ["--verify_only"])
            _check_fio(r, data, min_write=0, what="fio --verify_only on fresh mount")


def _threads(pid):
    return len(os.listdir("/proc/%d/task" % pid))


def test_large_reads_in_parallel_use_the_reply_thread():
    # READ replies of 128 KiB and more, with other requests in flight, go out
    # from a second thread (--reply-thread auto, the default); the bytes must be
    # the same either way, and "off" must keep the bridge to one thread.
    with h.Nbdkit(["memory", str(EXPORT_SIZE)]) as srv:
        common = ["--ioengine=libaio", "--rw=write", "--bs=1M"]
        with h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
            # The large-write connection's thread starts, and names itself, just after
            # the mount appears (nbdkit memory advertises multi-conn).
            h.wait_until(lambda: su.threads_named(m.proc.pid, "nbdbridge-conn") == 1, timeout=10,
                         what="the large-write connection's thread")
            base = 2  # the loop and its large-write connection
            h.check_eq(_threads(m.proc.pid), base, "threads before any large read")
            r, data = _fio(m.export, common)
            _check_fio(r, data, what="fio seq write 1M")
            r, data = _fio(m.export, common + ["--verify_only"])
            _check_fio(r, data, min_write=0, what="fio --verify_only, 1M reads at depth 64")
            h.check_eq(_threads(m.proc.pid), base + 1, "threads after 1 MiB reads at depth 64")
        with h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--reply-thread", "off"]) as m:
            r, data = _fio(m.export, common + ["--verify_only"])
            _check_fio(r, data, min_write=0, what="fio --verify_only with --reply-thread off")
            h.check_eq(_threads(m.proc.pid), base, "threads with --reply-thread off")



def test_connection_threads_verify():
    # --connection-threads all: each NBD connection's socket is driven by its own
    # thread and handlers hop back to the loop; every byte must still be right,
    # with small and large (1 MiB) commands on several connections at once.
    with h.Nbdkit(["memory", str(EXPORT_SIZE)]) as srv:
        with h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--connection-threads", "all", "-C", "2"]) as m:
            # two data connections plus the block-status one, each with its thread
            h.wait_until(lambda: su.threads_named(m.proc.pid, "nbdbridge-conn") == 3, timeout=10,
                         what="three nbdbridge-conn threads (2 data + 1 block status)")
            r, data = _fio(m.export, ["--ioengine=libaio", "--rw=randrw", "--bsrange=4k-1M"])
            _check_fio(r, data, min_write=1, min_read=1, what="fio randrw 4k-1M with connection threads")
            r, data = _fio(m.export, ["--ioengine=libaio", "--rw=write", "--bs=1M"])
            _check_fio(r, data, what="fio seq write 1M with connection threads")
            r, data = _fio(m.export, ["--ioengine=libaio", "--rw=write", "--bs=1M", "--verify_only"])
            _check_fio(r, data, min_write=0, what="fio --verify_only, 1M reads with connection threads")
            # --reply-thread auto: the loop sends large replies itself here
            h.check_eq(_threads(m.proc.pid), 4, "threads: the loop and three connection threads, "
                       "no reply thread")
        h.check("stats at exit" in m.stderr(), "no 'stats at exit' line after a clean unmount: %s"
                % m.stderr()[-1000:])
        with h.Mount(h.tmpdir("mp"), [srv.uri], opts=["-C", "2", "--connection-threads", "off"]) as m:
            r, data = _fio(m.export, ["--ioengine=libaio", "--rw=randrw", "--bs=4k"])
            _check_fio(r, data, min_write=1, min_read=1, what="fio randrw without connection threads")
            h.check_eq(su.threads_named(m.proc.pid, "nbdbridge-conn"), 0, "connection threads with off")


def test_socket_batching_on_and_off_agree():
    # Data written with libnbd's socket calls batched (the default) reads back
    # right without batching, and the other way round; over a unix socket and TCP,
    # small and 1 MiB commands mixed at depth 64. (8 MiB per run: twelve runs.)
    mixed = ["--ioengine=libaio", "--rw=randrw", "--bsrange=4k-1M"]
    size = FIO_SIZE // 4
    for tcp in (False, True):
        with h.Nbdkit(["memory", str(EXPORT_SIZE)], tcp=tcp) as srv:
            for writer, reader in (("on", "off"), ("off", "on")):
                what = "%s, written with batching %s" % ("tcp" if tcp else "unix", writer)
                with h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--socket-batching", writer]) as m:
                    r, data = _fio(m.export, mixed, size=size)
                    _check_fio(r, data, min_write=1, min_read=1, what="fio randrw, " + what)
                    r, data = _fio(m.export, ["--ioengine=libaio", "--rw=write", "--bs=1M"], size=size)
                    _check_fio(r, data, min_write=size, min_read=size, what="fio seq write 1M, " + what)
                with h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--socket-batching", reader]) as m:
                    r, data = _fio(m.export, ["--ioengine=libaio", "--rw=write", "--bs=1M", "--verify_only"],
                                   size=size)
                    _check_fio(r, data, min_write=0, min_read=size,
                               what="fio --verify_only with batching %s, %s" % (reader, what))


def test_randrw_page_cache_mode():
    # --cache=page, still O_DIRECT from fio's side
    with h.Nbdkit(["memory", str(EXPORT_SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--cache=page"]) as m:
        r, data = _fio(m.export, ["--ioengine=libaio", "--rw=randwrite", "--bs=16k"])
        _check_fio(r, data, what="fio libaio randwrite 16k --cache=page")


if __name__ == "__main__":
    h.main(globals())
