#!/usr/bin/env python3
"""READs answered by splice() (--spliced-reads, on by default).

A READ of 128 KiB and more moves its payload from the NBD socket into a pipe
that holds the FUSE reply's header, and from there to the reader. These tests
check that the reader gets the server's bytes at every size and alignment,
over unix and TCP, with simple and structured replies; that the statistics show
the reads really went by pipe (and none with --spliced-reads off); and that a
pipe is left clean after a server error, a request timed out before its reply
and a connection lost in the middle of payloads, so the next reply through the
same pipe carries its own bytes, not a stale one's.
"""
import errno
import json
import mmap
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

MiB = 1024 * 1024
SIZE = 32 * MiB


def _image(size=SIZE):
    path = os.path.join(h.tmpdir("img"), "disk.img")
    h.fill_random_file(path, size)
    with open(path, "rb") as f:
        return path, f.read()


def _stats(mount):
    r = h.run([h.NBDBRIDGE, "stats", mount.mountdir], timeout=15)
    h.check_eq(r.returncode, 0, "nbdbridge stats exit (stderr %r)" % r.stderr)
    return json.loads(r.stdout)["spliced_reads"]


def _direct_read(path, offset, length):
    """One O_DIRECT pread (offset and length 4 KiB multiples): one FUSE READ."""
    buf = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        got = os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
    return bytes(buf[:got])


# (offset, length): 128 KiB (the smallest spliced READ), odd 4 KiB multiples,
# 1 MiB at and off 1 MiB boundaries, and the export's last MiB.
READS = [(0, 128 * 1024), (4096, 132 * 1024), (3 * MiB, MiB), (5 * MiB + 4096, MiB),
         (7 * MiB - 8192, 516 * 1024), (SIZE - MiB, MiB)]


def _check_reads(mount, content, what):
    for offset, length in READS:
        h.check_bytes(_direct_read(mount.export, offset, length), content[offset:offset + length],
                      "%s: O_DIRECT read of %d at %d" % (what, length, offset))
    # Buffered: the kernel's readahead asks for large READs at its own offsets.
    with open(mount.export, "rb") as f:
        f.seek(12345)
        h.check_bytes(f.read(3 * MiB), content[12345:12345 + 3 * MiB], "%s: buffered read" % what)


def test_spliced_reads_return_the_servers_bytes():
    img, content = _image()
    for tcp in (False, True):
        with h.Nbdkit(["file", img], tcp=tcp) as srv:
            for replies in ("simple", "structured"):
                what = "%s, %s replies" % ("tcp" if tcp else "unix", replies)
                with h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--replies", replies]) as m:
                    _check_reads(m, content, what)
                    spliced = _stats(m)
                    h.check(spliced["piped"] >= len(READS), "%s: reads went by pipe: %r" % (what, spliced))
                    h.check_eq(spliced["fallbacks"], 0, "%s: reads copied after all" % what)
                    h.log("  %s: %r" % (what, spliced))
            # Each connection on a thread of its own: the payload is registered
            # and piped there, and the reply sent from the loop.
            if not tcp:
                with h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--connection-threads", "all"]) as m:
                    _check_reads(m, content, "unix, --connection-threads all")
                    h.check(_stats(m)["piped"] >= len(READS), "--connection-threads all: reads went by pipe")


def test_spliced_reads_off_copies():
    img, content = _image()
    with h.Nbdkit(["file", img]) as srv:
        for opts in (["--spliced-reads", "off"], ["--socket-batching", "off"]):
            with h.Mount(h.tmpdir("mp"), [srv.uri], opts=opts) as m:
                _check_reads(m, content, " ".join(opts))
                h.check_eq(_stats(m)["piped"], 0, "%s: reads went by pipe" % " ".join(opts))


def _commands_by_role(mount):
    r = h.run([h.NBDBRIDGE, "stats", mount.mountdir], timeout=15)
    links = json.loads(r.stdout)["connections"]
    h.log("  commands per connection: %r" % [(link["role"], link["commands"]) for link in links])
    return {link["role"]: link["commands"] for link in links}


def test_large_requests_share_the_block_status_connection():
    # With multi-conn, small requests keep to the data connection while large
    # READs are spread over it and the block-status connection, and large WRITEs
    # over that one and the large-write connection: a second socket, so a
    # payload waits less for a socket buffer to drain.
    with h.Nbdkit(["memory", str(SIZE)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fio = ["fio", "--name=j", "--verify_state_save=0", "--filename=" + m.export, "--bs=1M", "--iodepth=8",
               "--ioengine=libaio", "--direct=1", "--size=%d" % SIZE, "--verify=crc32c", "--output-format=json"]
        r = h.run(fio + ["--rw=write", "--do_verify=0"], timeout=60)
        h.check_eq(r.returncode, 0, "fio 1 MiB writes (stderr %r)" % r.stderr[-1000:])
        written = _commands_by_role(m)
        h.check(written.get("block_status", 0) >= 4, "large writes on the block-status connection")
        h.check(written.get("large_writes", 0) >= 4, "large writes on the large-write connection")
        r = h.run(fio + ["--rw=read", "--verify_only"], timeout=60)
        h.check_eq(r.returncode, 0, "fio 1 MiB reads verified (stderr %r)" % r.stderr[-1000:])
        read = _commands_by_role(m)
        h.check(read["block_status"] - written["block_status"] >= 4, "large reads on the block-status connection")
        h.check(read["data"] - written["data"] >= 4, "large reads on the data connection")


def test_holes_in_structured_replies():
    # qemu-nbd answers a READ over a sparse image with structured chunks: data
    # where the image has some and holes (which libnbd fills with zeros, no bytes
    # on the wire) elsewhere. A pipe then holds only the data before the first
    # hole or none; the reply falls back to the buffer and must still be exact.
    h.run(["qemu-nbd", "--version"], timeout=10, check=True)
    img = os.path.join(h.tmpdir("sparse"), "disk.raw")
    content = bytearray(8 * MiB)
    with open(img, "wb") as f:
        f.truncate(len(content))
        for offset, length in ((MiB, 512 * 1024), (3 * MiB - 4096, 8192), (5 * MiB + 65536, 1536 * 1024)):
            data = os.urandom(length)
            f.seek(offset)
            f.write(data)
            content[offset:offset + length] = data
    with h.Mount(h.tmpdir("mp"), ["[", "qemu-nbd", "-f", "raw", img, "]"]) as m:
        for offset in range(0, 8 * MiB, 256 * 1024):
            for length in (256 * 1024, MiB):
                if offset + length <= len(content):
                    h.check_bytes(_direct_read(m.export, offset, length), bytes(content[offset:offset + length]),
                                  "qemu-nbd: read of %d at %d" % (length, offset))
        spliced = _stats(m)
        h.log("  %r" % spliced)
        h.check(spliced["fallbacks"] > 0, "replies with holes fell back: %r" % spliced)


SH_PLUGIN = r"""#!/bin/bash
# A file-backed disk whose reads fail with EIO while $dir/fail exists and take
# 3 s while $dir/slow exists.
disk=%(disk)s
dir=%(dir)s
case "$1" in
  get_size) stat -c %%s "$disk" ;;
  thread_model) echo parallel ;;
  can_write|can_flush) exit 0 ;;
  can_trim|can_zero|can_extents|can_multi_conn|is_rotational|can_fast_zero) exit 3 ;;
  can_fua|can_cache) echo none ;;
  pread)
    if [ -e "$dir/fail" ]; then echo "EIO injected read error" >&2; exit 1; fi
    if [ -e "$dir/slow" ]; then sleep 3; fi
    exec dd if="$disk" bs=65536 iflag=skip_bytes,count_bytes,fullblock skip="$4" count="$3" status=none
    ;;
  *) exit 2 ;;
esac
"""


class SwitchServer(h.Nbdkit):
    def __init__(self, img):
        self.dir = h.tmpdir("sh")
        script = os.path.join(self.dir, "plugin.sh")
        with open(script, "w") as f:
            f.write(SH_PLUGIN % {"disk": img, "dir": self.dir})
        os.chmod(script, 0o755)
        super().__init__(["sh", script])

    def switch(self, name, on):
        path = os.path.join(self.dir, name)
        if on:
            open(path, "w").close()
        elif os.path.exists(path):
            os.unlink(path)


def _read_errno(path, offset, length):
    try:
        _direct_read(path, offset, length)
        return 0
    except OSError as e:
        return e.errno


def test_server_error_then_the_same_pipe_carries_good_data():
    img, content = _image(8 * MiB)
    with SwitchServer(img) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        h.check_bytes(_direct_read(m.export, 0, MiB), content[:MiB], "read before the errors")
        srv.switch("fail", True)
        for offset in (MiB, 2 * MiB, 3 * MiB):
            h.check_eq(h.errno_name(_read_errno(m.export, offset, MiB)), "EIO", "read at %d with EIO" % offset)
        srv.switch("fail", False)
        for offset in (4 * MiB, 5 * MiB):
            h.check_bytes(_direct_read(m.export, offset, MiB), content[offset:offset + MiB],
                          "read at %d after the errors" % offset)
        spliced = _stats(m)
        h.check(spliced["piped"] >= 3, "good reads went by pipe: %r" % spliced)
        h.check_eq(spliced["fallbacks"], 0, "server errors are not fallbacks")


def test_reply_after_the_request_timed_out_is_drained():
    img, content = _image(8 * MiB)
    with SwitchServer(img) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--request-timeout", "1"]) as m:
        srv.switch("slow", True)
        h.check_eq(h.errno_name(_read_errno(m.export, 2 * MiB, MiB)), "EIO", "read that timed out")
        srv.switch("slow", False)

        def replies_received():
            r = h.run([h.NBDBRIDGE, "stats", m.mountdir], timeout=15)
            return json.loads(r.stdout)["operations"]["read"]["nbd_latency_us"]["count"] >= 1 or None
        # The server answers the timed-out read after 3 s, into its pipe, which
        # is drained and reused by the reads below: each must see its own bytes.
        h.wait_until(replies_received, timeout=20, what="the late reply to arrive")
        for i in range(16):
            offset = (i % 7) * MiB
            h.check_bytes(_direct_read(m.export, offset, MiB), content[offset:offset + MiB],
                          "read %d after the late reply" % i)
        h.check(_stats(m)["piped"] >= 16, "reads after the late reply went by pipe: %r" % _stats(m))


if __name__ == "__main__":
    h.main(globals())
