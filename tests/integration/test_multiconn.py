#!/usr/bin/env python3
"""Multi-conn: with a server that advertises NBD_FLAG_CAN_MULTI_CONN the
bridge opens -C N connections (default 4) and spreads requests over all of
them; with a server that does not, or with -C 1, it uses one.  The nbdkit log
filter shows the connections and which requests each carried.
"""
import collections
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import semantics_util as su  # noqa: E402

SIZE = 128 * 1024 * 1024
FIO_SIZE = 32 * 1024 * 1024


def _per_connection(logfile):
    acts = collections.defaultdict(collections.Counter)
    for r in su.log_requests(logfile):
        acts[r["conn"]][r["act"]] += 1
    return acts


def _fio_load(export):
    r, data = su.fio_json(export, [
        "--name=mc", "--size=%d" % FIO_SIZE, "--direct=1", "--ioengine=libaio",
        "--iodepth=32", "--rw=randwrite", "--bs=4k", "--randseed=77",
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--exitall_on_error=1"],
        timeout=80)
    h.check_eq(r.returncode, 0, "fio exit status (stderr: %s)" % r.stderr.strip()[-2000:])
    for job in data["jobs"]:
        h.check_eq(job.get("error"), 0, "fio job error")
        h.check(job["write"]["io_bytes"] >= FIO_SIZE, "fio wrote %d bytes" % job["write"]["io_bytes"])
        h.check(job["read"]["io_bytes"] >= FIO_SIZE, "fio verified %d bytes" % job["read"]["io_bytes"])


def _shadow_check(export, rnd, n=64):
    """Writes then reads that may travel on different connections."""
    fd = os.open(export, os.O_RDWR)
    try:
        for _ in range(n):
            off = rnd.randrange(0, SIZE - 70000)
            data = rnd.randbytes(rnd.randrange(1, 70000))
            h.pwrite_full(fd, data, off)
            h.check_bytes(h.pread_full(fd, len(data), off), data, "read-after-write off=%d" % off)
    finally:
        os.close(fd)


def test_four_connections_all_used():
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with h.Nbdkit(["memory", str(SIZE), "logfile=" + logfile], opts=["--filter=log"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["-C", "4"]) as m:
        conns = su.log_connects(logfile)
        h.check_eq(sorted(conns), [1, 2, 3, 4], "connections opened for -C 4")
        _fio_load(m.export)
        _shadow_check(m.export, random.Random(3))
        acts = _per_connection(logfile)
        for c in sorted(conns):
            h.check(acts[c]["Write"] > 0 and acts[c]["Read"] > 0,
                    "connection %d carried no Read/Write traffic: %r (all: %r)"
                    % (c, dict(acts[c]), {k: dict(v) for k, v in acts.items()}))
        # a fair spread: no connection carries almost everything
        total = sum(acts[c]["Write"] + acts[c]["Read"] for c in conns)
        for c in conns:
            share = (acts[c]["Write"] + acts[c]["Read"]) / total
            h.check(share < 0.7, "connection %d carried %.0f%% of the requests" % (c, share * 100))
        h.check_eq(set(acts) - set(conns), set(), "requests on connections never opened")
        fails = su.log_failed_replies(logfile)
        h.check(not fails, "server saw failed requests: %r" % fails[:5])


def test_default_connections_follow_cpus():
    # -C auto (the default): 4 connections with 4 or more CPUs, else 1 (on 2 CPUs
    # one loop thread over one connection measured fastest; see README).
    expected = [1, 2, 3, 4] if (os.cpu_count() or 1) >= 4 else [1]
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with h.Nbdkit(["memory", str(SIZE), "logfile=" + logfile], opts=["--filter=log"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]):
        h.check_eq(sorted(su.log_connects(logfile)), expected, "connections by default")


def test_two_connections():
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with h.Nbdkit(["memory", str(SIZE), "logfile=" + logfile], opts=["--filter=log"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["-C", "2"]) as m:
        h.check_eq(sorted(su.log_connects(logfile)), [1, 2], "connections for -C 2")
        _shadow_check(m.export, random.Random(4), n=32)


def _single_connection_case(opts, server_opts, args_extra, what):
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with h.Nbdkit(["memory", str(SIZE), "logfile=" + logfile] + args_extra,
                  opts=["--filter=log"] + server_opts) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=opts) as m:
        _fio_load(m.export)
        _shadow_check(m.export, random.Random(5), n=32)
        conns = su.log_connects(logfile)
        h.check_eq(len(conns), 1, "%s: connections opened (%r)" % (what, sorted(conns)))
        acts = _per_connection(logfile)
        h.check_eq(sorted(acts), sorted(conns), "%s: connections that carried requests" % what)
        fails = su.log_failed_replies(logfile)
        h.check(not fails, "server saw failed requests: %r" % fails[:5])


def test_no_multiconn_server_one_connection():
    _single_connection_case(["-C", "4"], ["--filter=multi-conn"], ["multi-conn-mode=disable"],
                            "server without multi-conn")


def test_C1_one_connection():
    _single_connection_case(["-C", "1"], [], [], "-C 1")


if __name__ == "__main__":
    h.main(globals())
