#!/usr/bin/env python3
"""TLS: nbds+unix URIs with a PSK file and with X.509 certificates against
nbdkit --tls=require; wrong keys, untrusted certificates and a plain URI
against a TLS-only server fail fast with one line and mount nothing.
Needs certtool and psktool (Debian package gnutls-bin).
"""
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import semantics_util as su  # noqa: E402

SIZE = 8 * 1024 * 1024
FAIL_DEADLINE = 15.0


def _psk_file(user="alice"):
    su.need("psktool")
    path = os.path.join(h.tmpdir("psk"), "keys.psk")
    h.run(["psktool", "-u", user, "-p", path], timeout=20, check=True)
    return path


def _certtool(args, outfile=None):
    r = h.run(["certtool"] + args, timeout=30)
    if r.returncode != 0:
        raise h.TestFailure("certtool %r failed: %s" % (args, r.stderr))
    if outfile:
        with open(outfile, "w") as f:
            f.write(r.stdout)
        os.chmod(outfile, 0o600)


def _make_pki():
    """CA, server and client certificates in the layouts nbdkit and libnbd want."""
    su.need("certtool")
    d = h.tmpdir("pki")
    srv, cli = os.path.join(d, "server"), os.path.join(d, "client")
    os.mkdir(srv)
    os.mkdir(cli)

    def template(name, text):
        p = os.path.join(d, name)
        with open(p, "w") as f:
            f.write(text)
        return p
    ca_key = os.path.join(d, "ca-key.pem")
    _certtool(["--generate-privkey"], ca_key)
    _certtool(["--generate-self-signed", "--load-privkey", ca_key, "--template",
               template("ca.info", "cn = nbdbridge test CA\nca\ncert_signing_key\nexpiration_days = 2\n"),
               "--outfile", os.path.join(d, "ca-cert.pem")])
    ca = os.path.join(d, "ca-cert.pem")
    for side, dest, info in (
            ("server", srv, "organization = test\ncn = localhost\ndns_name = localhost\n"
                            "ip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n"
                            "expiration_days = 2\n"),
            ("client", cli, "organization = test\ncn = client\ntls_www_client\nencryption_key\n"
                            "signing_key\nexpiration_days = 2\n")):
        key = os.path.join(dest, "%s-key.pem" % side)
        _certtool(["--generate-privkey"], key)
        _certtool(["--generate-certificate", "--load-ca-certificate", ca, "--load-ca-privkey", ca_key,
                   "--load-privkey", key, "--template", template(side + ".info", info),
                   "--outfile", os.path.join(dest, "%s-cert.pem" % side)])
        with open(ca) as f, open(os.path.join(dest, "ca-cert.pem"), "w") as g:
            g.write(f.read())
    return srv, cli


def _read_write_through(uri, srv, logfile):
    rnd = random.Random(11)
    with h.Mount(h.tmpdir("mp"), [uri]) as m:
        h.check_eq(os.stat(m.export).st_size, SIZE, "st_size over TLS")
        fd = os.open(m.export, os.O_RDWR)
        try:
            writes = []
            for _ in range(20):
                off = rnd.randrange(0, SIZE - 300000)
                data = rnd.randbytes(rnd.randrange(1, 300000))
                h.pwrite_full(fd, data, off)
                writes.append((off, data))
                h.check_bytes(h.pread_full(fd, len(data), off), data, "TLS read-after-write")
            os.fsync(fd)
        finally:
            os.close(fd)
    conns = su.log_connects(logfile)
    h.check(conns, "no connection logged")
    h.check(all(c.get("tls") == "1" for c in conns.values()),
            "every connection must use TLS: %r" % conns)
    # the server has the data (fetched with nbdcopy over the same TLS URI)
    img = su.server_image(uri)
    shadow = bytearray(SIZE)
    for off, data in writes:
        shadow[off:off + len(data)] = data
    h.check_bytes(img, bytes(shadow), "server image over TLS")


def _expect_failure(uri, what):
    mp = h.tmpdir("mp")
    t0 = time.monotonic()
    rc, err = h.nbdbridge_run(["--connect-timeout", "10", mp, uri], timeout=FAIL_DEADLINE + 5)
    dt = time.monotonic() - t0
    h.check(rc != "timeout", "%s: nbdbridge still running after %ss" % (what, FAIL_DEADLINE + 5))
    h.check(rc != 0, "%s: exit status 0 (stderr %r)" % (what, err))
    h.check(dt < FAIL_DEADLINE, "%s: took %.1fs to fail" % (what, dt))
    su.check_one_line_error(err, what)
    h.check(not h.is_mounted(mp), "%s: something is mounted on %s" % (what, mp))
    h.check_eq(os.listdir(mp), [], "%s: mountpoint contents" % what)
    return err


def test_psk_read_write():
    psk = _psk_file()
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with h.Nbdkit(["memory", str(SIZE), "logfile=" + logfile],
                  opts=["--tls=require", "--tls-psk=" + psk, "--filter=log"]) as srv:
        uri = "nbds+unix://alice@/?socket=%s&tls-psk-file=%s" % (srv.sock, psk)
        _read_write_through(uri, srv, logfile)


def test_x509_read_write():
    srv_dir, cli_dir = _make_pki()
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with h.Nbdkit(["memory", str(SIZE), "logfile=" + logfile],
                  opts=["--tls=require", "--tls-certificates=" + srv_dir, "--tls-verify-peer",
                        "--filter=log"]) as srv:
        uri = "nbds+unix:///?socket=%s&tls-certificates=%s" % (srv.sock, cli_dir)
        _read_write_through(uri, srv, logfile)


def test_wrong_psk_fails_fast():
    good = _psk_file()
    bad = _psk_file()          # same user name, different key
    with open(good) as f, open(bad) as g:
        h.check(f.read() != g.read(), "psktool produced the same key twice")
    with h.Nbdkit(["memory", str(SIZE)], opts=["--tls=require", "--tls-psk=" + good]) as srv:
        uri = "nbds+unix://alice@/?socket=%s&tls-psk-file=%s" % (srv.sock, bad)
        err = _expect_failure(uri, "wrong PSK")
        h.check("check the key file" in err, "the wrong PSK's message does not point at the key: %r" % err)
        # unknown user name
        uri = "nbds+unix://mallory@/?socket=%s&tls-psk-file=%s" % (srv.sock, _psk_file("mallory"))
        _expect_failure(uri, "unknown PSK user")
        h.check(srv.proc.poll() is None, "nbdkit died")


def test_untrusted_server_certificate_fails():
    # (over TCP: libnbd checks the server certificate against the host name
    # in the URI; a unix socket has none)
    srv_dir, cli_dir = _make_pki()
    _, other_cli = _make_pki()       # a client that trusts another CA
    with h.Nbdkit(["memory", str(SIZE)], tcp=True,
                  opts=["--tls=require", "--tls-certificates=" + srv_dir]) as srv:
        # the good client works over TCP too (the failure below is the CA's)
        uri = "nbds://localhost:%d/?tls-certificates=%s" % (srv.port, cli_dir)
        with h.Mount(h.tmpdir("mp"), [uri]) as m:
            h.check_eq(os.stat(m.export).st_size, SIZE, "st_size over TLS/TCP")
        uri = "nbds://localhost:%d/?tls-certificates=%s" % (srv.port, other_cli)
        _expect_failure(uri, "server certificate from an untrusted CA")


def test_tls_required_plain_uri_fails():
    psk = _psk_file()
    with h.Nbdkit(["memory", str(SIZE)], opts=["--tls=require", "--tls-psk=" + psk]) as srv:
        _expect_failure(srv.uri, "plain URI against --tls=require")
        _expect_failure("nbds+unix:///?socket=%s" % srv.sock, "nbds URI without credentials")


def test_tls_list_exports():
    psk = _psk_file()
    with h.Nbdkit(["memory", str(SIZE)], opts=["--tls=require", "--tls-psk=" + psk]) as srv:
        uri = "nbds+unix://alice@/?socket=%s&tls-psk-file=%s" % (srv.sock, psk)
        r = h.run([h.NBDBRIDGE, "--list", uri], timeout=20)
        h.check_eq(r.returncode, 0, "--list over TLS rc (stderr %r)" % r.stderr)
        lines = su.nonempty_lines(r.stdout)
        h.check_eq(len(lines), 1, "--list lines: %r" % r.stdout)
        h.check_eq(lines[0].split("\t")[1], str(SIZE), "--list size over TLS")


if __name__ == "__main__":
    h.main(globals())
