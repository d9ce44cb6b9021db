#!/usr/bin/env python3
"""Live statistics and client-side fault injection.

Statistics are read three ways (the .stats file of a directory mount,
`nbdbridge stats MOUNTPOINT`, --stats-file at exit) and must count the I/O the
test did. An injected 2 ms delay must show in the NBD span; the same seed must
give the same sequence of injected errors; injected errors must reach the
application with the chosen errno.
"""
import errno
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

SIZE = 16 * 1024 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _stats_via_command(path):
    r = h.run([h.NBDBRIDGE, "stats", path], timeout=15)
    h.check_eq(r.returncode, 0, "nbdbridge stats exit (stderr %r)" % r.stderr)
    return json.loads(r.stdout)


def _direct_reads(path, count, length=4096):
    """count sequential O_DIRECT reads; returns the errno (or 0) of each."""
    import mmap
    buf = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    results = []
    try:
        for i in range(count):
            try:
                os.preadv(fd, [buf], i * length)
                results.append(0)
            except OSError as e:
                results.append(e.errno)
    finally:
        os.close(fd)
    return results


def test_counts_through_stats_file_and_command():
    with h.Nbdkit(["memory", str(SIZE)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDWR)
        try:
            for i in range(10):
                os.pwrite(fd, b"x" * 4096, i * 4096)
            for i in range(20):
                h.pread_full(fd, 4096, i * 4096)
        finally:
            os.close(fd)
        with open(os.path.join(m.mountdir, ".stats")) as f:
            from_file = json.load(f)
        h.check_eq(from_file["version"], 1, "version")
        h.check(from_file["operations"]["write"]["count"] >= 10, "writes counted: %r" % from_file["operations"]["write"])
        h.check(from_file["operations"]["write"]["bytes"] >= 40960, "write bytes counted")
        h.check(from_file["operations"]["read"]["count"] >= 20, "reads counted")
        for span in ("fuse_latency_us", "nbd_latency_us"):
            lat = from_file["operations"]["read"][span]
            h.check(0 < lat["p50"] <= lat["p99"] <= lat["max"], "%s percentiles ordered: %r" % (span, lat))
        h.check(".stats" not in os.listdir(m.mountdir), ".stats is not listed")
        # .stats is its own file (st_size 0): no data or hole of the export's, no flush.
        fd = os.open(os.path.join(m.mountdir, ".stats"), os.O_RDONLY)
        try:
            for whence, name in ((os.SEEK_DATA, "SEEK_DATA"), (os.SEEK_HOLE, "SEEK_HOLE")):
                e, _ = h.os_errno(os.lseek, fd, 0, whence)
                h.check_eq(h.errno_name(e), "ENXIO", "lseek(.stats, 0, %s)" % name)
            flushes = _stats_via_command(m.mountdir)["operations"]["flush"]["count"]
            os.fsync(fd)
            h.check_eq(_stats_via_command(m.mountdir)["operations"]["flush"]["count"], flushes,
                       "flushes after an fsync of .stats")
        finally:
            os.close(fd)
        # The command finds the bridge from the directory and from the export file.
        for path in (m.mountdir, m.export):
            d = _stats_via_command(path)
            h.check(d["operations"]["write"]["count"] >= 10, "stats via %s" % path)
        # nbdkit memory advertises multi-conn: one data connection (on 2 CPUs; 4 with
        # 4 or more), the large-write connection (idle here: only small writes) and the
        # block-status connection, which carried no reads or writes.
        links = _stats_via_command(m.mountdir)["connections"]
        data_links = 4 if (os.cpu_count() or 1) >= 4 else 1
        h.check_eq([c["role"] for c in links], ["data"] * data_links + ["large_writes", "block_status"],
                   "connection roles")
        h.check(all(c["commands"] > 0 for c in links[:data_links]), "data connections carried commands: %r" % links)
        r = h.run([h.NBDBRIDGE, "stats", "--reset", m.mountdir], timeout=15)
        h.check_eq(r.returncode, 0, "stats --reset")
        h.check_eq(_stats_via_command(m.mountdir)["operations"]["write"]["count"], 0, "writes after reset")


def test_stats_of_file_mode_mount_and_missing_bridge():
    target = os.path.join(h.tmpdir("fm"), "disk.img")
    open(target, "wb").close()
    # The bridge started in another session (ssh, su): XDG_RUNTIME_DIR differs from the
    # one `nbdbridge stats` sees, and the session's directory may be gone by then.
    env = dict(os.environ, XDG_RUNTIME_DIR=h.tmpdir("session"))
    with h.Nbdkit(["memory", str(SIZE)]) as srv, h.Mount(target, [srv.uri], env=env) as m:
        fd = os.open(m.export, os.O_RDONLY)
        try:
            h.pread_full(fd, 4096, 0)
        finally:
            os.close(fd)
        h.check(_stats_via_command(target)["operations"]["read"]["count"] >= 1, "file mode stats")
    r = h.run([h.NBDBRIDGE, "stats", h.tmpdir("nothing")], timeout=15)
    h.check(r.returncode != 0, "stats of a directory with no bridge fails")
    h.check_eq(len(r.stderr.strip().splitlines()), 1, "one error line: %r" % r.stderr)


def test_stats_file_interval_and_exit_summary():
    out = os.path.join(h.tmpdir("sf"), "final.json")
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        m = h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--stats-interval", "0.2", "--stats-file", out])
        with m:
            _direct_reads(m.export, 5)
            h.wait_until(lambda: "stats:" in m.stderr(), timeout=10, what="a periodic summary line")
        h.check("stats at exit" in m.stderr(), "summary at exit: %r" % m.stderr())
        with open(out) as f:
            final = json.load(f)
        h.check(final["operations"]["read"]["count"] >= 5, "final JSON counts the reads")


def test_stats_file_on_a_fifo_nobody_reads():
    # The exit must not wait for ever to open a FIFO with no reader: one line, exit 1.
    fifo = os.path.join(h.tmpdir("sf"), "fifo")
    os.mkfifo(fifo)
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        m = h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--stats-file", fifo], expect_exit=1)
        with m:
            h.check_eq(h.run(["fusermount3", "-u", m.mountdir], timeout=15).returncode, 0, "unmount")
            m.wait_exit(timeout=10)
        h.check("cannot write the statistics file" in m.stderr(), "the reason: %s" % m.stderr())


def test_injected_delay_raises_nbd_span():
    # Both mounts at once, their reads interleaved in batches: a slow spell of the
    # machine (the sanitizer build beside the first pass) then weighs on both alike.
    with h.Nbdkit(["memory", str(SIZE)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as plain, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--inject-delay", "2ms", "--seed", "5"]) as delayed:
        for _ in range(10):
            for m in (plain, delayed):
                h.check_eq(set(_direct_reads(m.export, 15)), {0}, "reads succeed")
        base, raised = (_stats_via_command(m.mountdir)["operations"]["read"]["nbd_latency_us"]["p50"]
                        for m in (plain, delayed))
    rise_ms = (raised - base) / 1000.0
    h.log("NBD p50: %.1f us without, %.1f us with 2 ms injected" % (base, raised))
    # Not less than the delay, and not twice it.
    h.check(1.7 <= rise_ms <= 4.0, "NBD span p50 rose by %.2f ms, expected about 2 ms" % rise_ms)


def test_injected_faults_keep_the_fast_path():
    # A run with injected delays must take the same data path as one without, or
    # an A/B of a delay measures a change of code path too: 1 MiB reads are still
    # spliced, 1 MiB writes still sent by reference.
    with h.Nbdkit(["memory", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--inject-delay", "10us:constant"]) as m:
        d = h.tmpdir("fio")
        h.run(["fio", "--name=big", "--filename=" + m.export, "--rw=write", "--bs=1M", "--size=8M", "--direct=1",
               "--ioengine=io_uring", "--iodepth=4", "--verify=crc32c", "--verify_state_save=0"],
              timeout=60, check=True, cwd=d)
        stats = _stats_via_command(m.mountdir)
        h.check(stats["injected"]["delays"] >= 16, "delays injected: %r" % stats["injected"])
        h.check(stats["spliced_reads"]["piped"] > 0, "spliced reads with delays injected: %r" % stats["spliced_reads"])
        h.check(stats["spliced_writes"]["by_reference"] > 0, "writes by reference with delays injected: %r"
                % stats["spliced_writes"])


def _error_pattern(seed):
    with h.Nbdkit(["memory", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--inject-error", "0.3:EIO", "--seed", str(seed)]) as m:
        pattern = _direct_reads(m.export, 120)
        stats = _stats_via_command(m.mountdir)
        h.check_eq(stats["injected"]["errors"], sum(1 for e in pattern if e), "injected errors counted")
        return pattern


def test_same_seed_same_errors():
    first = _error_pattern(42)
    again = _error_pattern(42)
    other = _error_pattern(43)
    failures = sum(1 for e in first if e)
    h.check(15 <= failures <= 60, "about 30%% of 120 reads fail: %d" % failures)
    h.check_eq(set(first) - {0}, {errno.EIO}, "injected errno")
    h.check_eq(again, first, "same seed, same sequence")
    h.check(other != first, "another seed gives another sequence")


def test_injected_errno_reaches_application():
    with h.Nbdkit(["memory", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--inject-error", "1:ENOSPC"]) as m:
        fd = os.open(m.export, os.O_RDWR)
        try:
            h.check_eq(h.os_errno(os.pwrite, fd, b"y" * 4096, 0)[0], errno.ENOSPC, "write errno")
            h.check_eq(h.os_errno(os.pread, fd, 4096, 0)[0], errno.ENOSPC, "read errno")
            h.check_eq(h.os_errno(os.fsync, fd)[0], errno.ENOSPC, "fsync (flush) errno")
        finally:
            # Nothing was written (the write failed), so close() sends no flush.
            h.check_eq(h.os_errno(os.close, fd)[0], 0, "close errno")
    rc, err = h.nbdbridge_run(["--inject-error", "2:EIO", h.tmpdir("mp"), "nbd+unix:///?socket=/nonexistent"])
    h.check(rc != 0, "a rate above 1 is refused")
    h.check_eq(len(err.strip().splitlines()), 1, "one error line: %r" % err)
    h.check_eq(err.count("--inject-error"), 1, "the option named once: %r" % err)
    # ETIMEDOUT would reach the application as EIO: refused, not quietly changed.
    rc, err = h.nbdbridge_run(["--inject-error", "1:ETIMEDOUT", h.tmpdir("mp"), "nbd+unix:///?socket=/nonexistent"])
    h.check(rc != 0 and "would reach the application as EIO" in err, "ETIMEDOUT refused: %r" % err)
    h.check_eq(len(err.strip().splitlines()), 1, "one error line: %r" % err)


def test_plot_stats_makes_png():
    if not os.path.exists("/usr/bin/python3") or h.run(
            ["/usr/bin/python3", "-c", "import matplotlib"], timeout=60).returncode != 0:
        raise h.SkipTest("python3-matplotlib is not installed")
    d = h.tmpdir("plot")
    out = os.path.join(d, "stats.json")
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        with h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--stats-file", out]) as m:
            _direct_reads(m.export, 50)
    png = os.path.join(d, "stats.png")
    r = h.run([os.path.join(REPO, "tools", "plot-stats"), out, "-o", png], timeout=120)
    h.check_eq(r.returncode, 0, "plot-stats exit (stderr %r)" % r.stderr)
    with open(png, "rb") as f:
        h.check_eq(f.read(8), b"\x89PNG\r\n\x1a\n", "PNG signature")


if __name__ == "__main__":
    h.main(globals())
