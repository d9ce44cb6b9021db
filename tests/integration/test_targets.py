#!/usr/bin/env python3
"""Every TARGET form: URIs, [ CMD ARGS... ], --unix, --tcp, --fd."""
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

SIZE = 2 * 1024 * 1024 + 8 * 3 + 5


def _check_pattern(m, size=SIZE):
    st = os.stat(m.export)
    h.check_eq(st.st_size, size, "export size")
    with open(m.export, "rb") as f:
        h.check_bytes(f.read(), h.pattern_bytes(0, size), "pattern content")


def _check_rw(m, size):
    fd = os.open(m.export, os.O_RDWR)
    try:
        data = os.urandom(65536 + 3)
        h.pwrite_full(fd, data, 12345)
        os.fsync(fd)
        h.check_bytes(h.pread_full(fd, len(data), 12345), data, "readback")
        h.check_eq(os.fstat(fd).st_size, size, "export size")
    finally:
        os.close(fd)


def test_uri_unix():
    with h.Nbdkit(["pattern", str(SIZE)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        _check_pattern(m)


def test_uri_tcp():
    with h.Nbdkit(["pattern", str(SIZE)], tcp=True) as srv, \
            h.Mount(h.tmpdir("mp"), ["nbd://127.0.0.1:%d/" % srv.port]) as m:
        _check_pattern(m)


def test_uri_with_export_name():
    # The export name in the URI is honoured (the filter rejects others).
    with h.Nbdkit(["pattern", str(SIZE), "exportname-strict=true", "exportname=good"],
                  opts=["--filter=exportname"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri_export("good")]) as m:
        _check_pattern(m)
    with h.Nbdkit(["pattern", str(SIZE), "exportname-strict=true", "exportname=good"],
                  opts=["--filter=exportname"], tcp=True) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri_export("good")]) as m:
        _check_pattern(m)


def test_export_name_option():
    # -e names the export for --unix (and --tcp, --fd, [ CMD ]): the filter rejects others.
    with h.Nbdkit(["pattern", str(SIZE), "exportname-strict=true", "exportname=good"],
                  opts=["--filter=exportname"]) as srv:
        with h.Mount(h.tmpdir("mp"), ["--unix", srv.sock, "-e", "good"]) as m:
            _check_pattern(m)
        rc, err = h.nbdbridge_run([h.tmpdir("mp"), "--unix", srv.sock, "--export-name", "bad"], timeout=30)
        h.check(rc not in (0, "timeout"), "-e bad: exit status %r (stderr %r)" % (rc, err))


def test_unix_option():
    with h.Nbdkit(["memory", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), ["--unix", srv.sock]) as m:
        _check_rw(m, SIZE)


def test_tcp_option():
    with h.Nbdkit(["memory", str(SIZE)], tcp=True) as srv, \
            h.Mount(h.tmpdir("mp"), ["--tcp", "127.0.0.1", str(srv.port)]) as m:
        _check_rw(m, SIZE)


def _congestion_controls(pid):
    """The congestion control of each TCP socket of process pid, as `ss` reports it."""
    r = h.run(["ss", "-tnpiH"], timeout=10)
    h.check_eq(r.returncode, 0, "ss exit status (%s)" % r.stderr.strip())
    found, lines = [], r.stdout.splitlines()
    for index, line in enumerate(lines):
        if "pid=%d," % pid in line and index + 1 < len(lines):
            found.append(lines[index + 1].split()[0])  # the info line starts with the algorithm
    return found


def _named_congestion_control(system):
    """An available algorithm other than the system's default and reno (what auto sets):
    only then does the named case show the name was used. Loads a tcp_* module of the
    running kernel if none is available yet (modprobe: nothing is downloaded). None if
    there is no such algorithm."""
    def available():
        with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
            return [a for a in f.read().split() if a not in (system, "reno")]
    others = available()
    for module in ("tcp_cubic", "tcp_htcp", "tcp_vegas", "tcp_westwood"):
        if others:
            break
        try:
            h.run(["modprobe", "-q", module], timeout=10)
        except OSError:
            break         # (no modprobe)
        others = available()
    if not others:
        return None
    return "cubic" if "cubic" in others else others[0]


def test_tcp_congestion_control():
    # Over TCP to 127.0.0.1 the default (auto) sets reno on every connection: there
    # is no network to share, and a pacing algorithm (bbr) only delays our sends.
    # "system" keeps the system's choice; a name sets that one.
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        system = f.read().strip()
    cases = [([], "reno"), (["--tcp-congestion", "system"], system)]
    named = _named_congestion_control(system)
    if named:
        cases.append((["--tcp-congestion", named], named))
    else:
        h.log("  (no algorithm besides reno and the system's %s: the named case is left out)" % system)
    for opts, expected in cases:
        with h.Nbdkit(["memory", str(SIZE)], tcp=True) as srv, \
                h.Mount(h.tmpdir("mp"), ["nbd://127.0.0.1:%d/" % srv.port], opts=opts) as m:
            controls = _congestion_controls(m.proc.pid)
            h.check(controls and all(c == expected for c in controls),
                    "%r: congestion control of the bridge's connections %r, expected %s" % (opts, controls, expected))
            _check_rw(m, SIZE)
    # On a unix socket there is nothing to set: said, not ignored.
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        for option, value in (("--tcp-congestion", "reno"), ("--tcp-keepalive", "10")):
            for target in ([srv.uri], ["--unix", srv.sock]):
                rc, err = h.nbdbridge_run([option, value, h.tmpdir("mp")] + target)
                h.check(rc != 0 and "applies only to TCP" in err and len(err.strip().splitlines()) == 1,
                        "%s with %r: %d %r" % (option, target, rc, err))
        rc, err = h.nbdbridge_run(["--retry-timeout", "5", h.tmpdir("mp"), "[", "nbdkit", "memory", "1M", "]"])
        h.check(rc != 0 and "--retry-timeout does not apply" in err, "--retry-timeout with [ CMD ]: %d %r" % (rc, err))


def test_fd_unix_socket():
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(srv.sock)
        fd = s.fileno()
        # our copy is closed right after the spawn: the bridge owns the socket
        with h.Mount(h.tmpdir("mp"), ["--fd", str(fd)], pass_fds=(fd,),
                     after_start=s.close) as m:
            _check_rw(m, SIZE)
        s.close()


def test_fd_tcp_socket():
    with h.Nbdkit(["pattern", str(SIZE)], tcp=True) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        s.settimeout(None)
        fd = s.fileno()
        with h.Mount(h.tmpdir("mp"), ["--fd", str(fd)], pass_fds=(fd,),
                     after_start=s.close) as m:
            _check_pattern(m)
        s.close()


def test_fd_survives_only_in_bridge():
    # After the bridge exits, the server sees the connection closed.
    d = h.tmpdir("log")
    logfile = os.path.join(d, "log")
    with h.Nbdkit(["pattern", str(SIZE), "logfile=" + logfile], opts=["--filter=log"]) as srv:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(srv.sock)
        fd = s.fileno()
        with h.Mount(h.tmpdir("mp"), ["--fd", str(fd)], pass_fds=(fd,),
                     after_start=s.close) as m:
            _check_pattern(m)
        s.close()

        def disconnected():
            with open(logfile) as f:
                return any(" Disconnect " in ln for ln in f)
        h.wait_until(disconnected, timeout=10, what="server to see the --fd connection close")


def test_subprocess_server_pattern():
    with h.Mount(h.tmpdir("mp"), ["[", "nbdkit", "pattern", str(SIZE), "]"]) as m:
        _check_pattern(m)
        kids = [p for p in h.descendants(m.pid) if "nbdkit" in " ".join(h.proc_cmdline(p))]
        h.check(kids, "no nbdkit child process found")
        # started with systemd socket activation
        env = h.proc_environ(kids[0])
        h.check_eq(env.get("LISTEN_FDS"), "1", "LISTEN_FDS in server environment")
        h.check_eq(env.get("LISTEN_PID"), str(kids[0]), "LISTEN_PID in server environment")
    for p in kids:
        h.check(not h.pid_alive(p), "server process %d still alive after unmount" % p)


def test_subprocess_server_memory_rw():
    size = 16 * 1024 * 1024
    with h.Mount(h.tmpdir("mp"), ["[", "nbdkit", "memory", "16M", "]"]) as m:
        _check_rw(m, size)
        kids = h.descendants(m.pid)
    for p in kids:
        h.wait_until(lambda: not h.pid_alive(p), timeout=10,
                     what="server process %d to exit" % p)


def test_subprocess_server_with_options():
    # arguments are passed through verbatim, including ones starting with '-'
    with h.Mount(h.tmpdir("mp"), ["[", "nbdkit", "-r", "--filter=offset", "pattern", "4M",
                                  "offset=4096", "range=65536", "]"]) as m:
        st = os.stat(m.export)
        h.check_eq(st.st_size, 65536, "size with offset filter")
        h.check_eq(st.st_mode & 0o777, 0o444, "mode of server-readonly export")
        with open(m.export, "rb") as f:
            h.check_bytes(f.read(), h.pattern_bytes(4096, 65536), "offset pattern")


def test_subprocess_server_full_path():
    nbdkit = h.run(["sh", "-c", "command -v nbdkit"]).stdout.strip()
    with h.Mount(h.tmpdir("mp"), ["[", nbdkit, "pattern", str(SIZE), "]"]) as m:
        _check_pattern(m)


if __name__ == "__main__":
    h.main(globals())
