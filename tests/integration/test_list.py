#!/usr/bin/env python3
"""nbdbridge --list TARGET: one line per export, "name<TAB>size[<TAB>description]",
exit 0; bad targets give a non-zero exit and one line on stderr, within a
deadline, and nothing is mounted.
"""
import os
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import semantics_util as su  # noqa: E402

MiB = 1 << 20


def _list(args, timeout=30):
    r = h.run([h.NBDBRIDGE, "--list"] + list(args), timeout=timeout)
    return r


def _rows(r, what):
    h.check_eq(r.returncode, 0, "%s: --list exit status (stderr %r)" % (what, r.stderr))
    h.check_eq(r.stderr.strip(), "", "%s: --list stderr" % what)
    rows = []
    for ln in r.stdout.splitlines():
        h.check(ln.strip(), "%s: blank line in %r" % (what, r.stdout))
        f = ln.split("\t")
        h.check(2 <= len(f) <= 3, "%s: line %r is not name<TAB>size[<TAB>description]" % (what, ln))
        rows.append(f)
    return rows


def test_list_explicit_exports():
    args = ["memory", str(MiB), "exportname=a", "exportname=b", "exportname-list=explicit"]
    with h.Nbdkit(args, opts=["--filter=exportname"]) as srv:
        rows = _rows(_list([srv.uri]), "explicit list")
        h.check_eq([r[:2] for r in rows], [["a", str(MiB)], ["b", str(MiB)]], "exports")
        # the same through --unix and [ CMD ]
        rows = _rows(_list(["--unix", srv.sock]), "--unix")
        h.check_eq([r[0] for r in rows], ["a", "b"], "exports via --unix")
    rows = _rows(_list(["[", "nbdkit", "--filter=exportname"] + args + ["]"]), "[ CMD ]")
    h.check_eq([r[:2] for r in rows], [["a", str(MiB)], ["b", str(MiB)]], "exports via [ CMD ]")


def test_list_descriptions():
    args = ["memory", str(2 * MiB), "exportname=disk1", "exportname=disk2",
            "exportname-list=explicit", "exportdesc=fixed:scratch disk"]
    with h.Nbdkit(args, opts=["--filter=exportname"]) as srv:
        rows = _rows(_list([srv.uri]), "descriptions")
        h.check_eq(rows, [["disk1", str(2 * MiB), "scratch disk"], ["disk2", str(2 * MiB), "scratch disk"]],
                   "exports with descriptions")


def test_list_sizes_per_export():
    """nbdkit file dir=: every file is an export of its own size."""
    d = h.tmpdir("exports")
    sizes = {"small": 4096, "medium": 3 * MiB + 5, "big": 64 * MiB}
    for name, size in sizes.items():
        with open(os.path.join(d, name), "wb") as f:
            f.truncate(size)
    with h.Nbdkit(["file", "dir=" + d]) as srv:
        rows = _rows(_list([srv.uri]), "file dir=")
        got = {r[0]: r[1] for r in rows}
        h.check_eq(got, {k: str(v) for k, v in sizes.items()}, "export sizes")


def test_list_plain_server():
    with h.Nbdkit(["memory", str(5 * MiB)]) as srv:
        r = _list([srv.uri])
        rows = _rows(r, "plain server")
        h.check_eq(len(rows), 1, "exports of a plain server (%r)" % r.stdout)
        h.check(rows[0][0] in ("", '""'), "default export name shown as %r" % rows[0][0])
        h.check_eq(rows[0][1], str(5 * MiB), "size of the default export")
        # TCP too
    with h.Nbdkit(["memory", str(5 * MiB)], tcp=True) as srv:
        rows = _rows(_list(["--tcp", "127.0.0.1", str(srv.port)]), "--tcp")
        h.check_eq([r[1] for r in rows], [str(5 * MiB)], "size via --tcp")


def _expect_list_failure(args, what, deadline=15):
    t0 = time.monotonic()
    r = _list(args, timeout=deadline + 10)
    dt = time.monotonic() - t0
    h.check(r.returncode != 0, "%s: exit status 0 (stdout %r)" % (what, r.stdout))
    h.check(dt < deadline, "%s: took %.1fs" % (what, dt))
    h.check_eq(r.stdout, "", "%s: stdout" % what)
    su.check_one_line_error(r.stderr, what)
    return r


def test_list_bad_targets():
    d = h.tmpdir("bad")
    _expect_list_failure(["nbd+unix:///?socket=" + os.path.join(d, "missing.sock")], "missing socket")
    _expect_list_failure(["--unix", os.path.join(d, "missing.sock")], "missing socket via --unix")
    _expect_list_failure(["nbd://[bad"], "unparsable URI")
    _expect_list_failure(["--tcp", "127.0.0.1", str(h.free_tcp_port())], "closed TCP port")
    _expect_list_failure(["[", "false", "]"], "server command that exits")
    # The server's own reason, as when mounting, not the socket it never served.
    r = _expect_list_failure(["[", "nbdkit", "no-such-plugin", "]"], "server command that fails to start")
    h.check("failed to start" in r.stderr and "no-such-plugin" in r.stderr, "stderr: %r" % r.stderr)
    with h.Nbdkit(["memory", str(MiB), "exportname-list=error"], opts=["--filter=exportname"]) as srv:
        _expect_list_failure([srv.uri], "server refusing to list")
    h.check_eq(h.mounts_under(), [], "mounts after failed --list")


def test_list_silent_server_times_out():
    """A socket that accepts but never speaks: --connect-timeout bounds --list."""
    d = h.tmpdir("silent")
    path = os.path.join(d, "silent.sock")
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        ls.bind(path)
        ls.listen(4)
        r = _expect_list_failure(["--connect-timeout", "2", "--unix", path], "silent server", deadline=10)
        h.check("time" in r.stderr.lower(), "message should say it timed out: %r" % r.stderr)
    finally:
        ls.close()



def _processes_with(marker):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and marker in h.proc_cmdline(int(entry)):
            pids.append(int(entry))
    return pids


def test_list_silent_server_command_is_stopped():
    """--list [ CMD ] whose server never answers: the timeout ends nbdbridge, and the
    server with it (it must not stay behind, holding a socket nobody knows of)."""
    marker = "nbdbridge-silent-server-%d" % os.getpid()
    server = [sys.executable, "-c", "import time; time.sleep(120)", marker]
    try:
        r = _expect_list_failure(["--connect-timeout", "1", "["] + server + ["]"], "silent server command",
                                 deadline=10)
        h.check("time" in r.stderr.lower(), "message should say it timed out: %r" % r.stderr)
        h.wait_until(lambda: not _processes_with(marker), timeout=10,
                     what="the server command to end with nbdbridge")
    finally:
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    h.main(globals())
