#!/usr/bin/env python3
"""A real VM disk end to end (root): qcow2 images served by qemu-nbd through
the bridge.  qemu-img compare of the mounted raw file against the qcow2
source; then a fresh qcow2 is partitioned (GPT), loop-mounted with
partition scanning, formatted ext4, filled with files, checked with e2fsck,
and read back after a complete remount cycle (new qemu-nbd, new bridge).
Loop devices and file-system mounts are always removed in finally blocks.
Needs qemu-utils, parted, e2fsprogs, util-linux (losetup, mount).
"""
import hashlib
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import semantics_util as su  # noqa: E402

MiB = 1 << 20


def _qemu_target(img):
    return ["[", "qemu-nbd", "-f", "qcow2", img, "]"]


def _losetup(path, readonly=False):
    cmd = ["losetup", "--find", "--show", "--partscan"] + (["--read-only"] if readonly else []) + [path]
    r = h.run(cmd, timeout=30)
    h.check_eq(r.returncode, 0, "losetup rc (%s)" % r.stderr.strip())
    dev = r.stdout.strip()
    h.check(dev.startswith("/dev/loop"), "losetup printed %r" % r.stdout)
    return dev


def _partition(dev):
    """DEVp1.  --partscan makes the kernel scan synchronously; a kernel built
    without partition-table parsers finds nothing, so then the table is read
    from user space (through the loop device, i.e. through the bridge) and
    the partition is added with partx."""
    part = dev + "p1"
    if not os.path.exists(part):
        r = h.run(["partx", "-a", dev], timeout=30)
        h.check_eq(r.returncode, 0, "partx -a %s (%s)" % (dev, r.stderr.strip()))
    h.wait_until(lambda: os.path.exists(part), timeout=20, what="partition %s" % part)
    return part


def _loop_backing(dev):
    try:
        with open("/sys/block/%s/loop/backing_file" % os.path.basename(dev)) as f:
            return f.read().strip()
    except OSError:
        return None


def _detach(dev):
    """losetup -d, and wait until the device really let go of the file."""
    if dev is None:
        return
    h.run(["partx", "-d", dev], timeout=30)      # (best effort; nothing to do after --partscan)
    h.run(["losetup", "-d", dev], timeout=30)
    h.wait_until(lambda: _loop_backing(dev) is None, timeout=20,
                 what="loop device %s to detach" % dev)


def _umount(path):
    if path and os.path.ismount(path):
        r = h.run(["umount", path], timeout=60)
        if r.returncode != 0:
            h.run(["umount", "-l", path], timeout=30)
            raise h.TestFailure("umount %s failed: %s" % (path, r.stderr))


def _write_files(root, rnd):
    sums = {}
    os.makedirs(os.path.join(root, "sub", "deeper"))
    for i in range(24):
        sub = "sub/deeper" if i % 5 == 0 else ("sub" if i % 3 else "")
        name = os.path.join(sub, "f%02d.bin" % i)
        size = rnd.choice([0, 1, 4095, 4097, 65536 + 7, rnd.randrange(1, 2 * MiB)])
        data = rnd.randbytes(size)
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


def _check_files(root, sums, what):
    for name, digest in sums.items():
        with open(os.path.join(root, name), "rb") as f:
            got = hashlib.sha256(f.read()).hexdigest()
        h.check_eq(got, digest, "%s: checksum of %s" % (what, name))


def test_qemu_img_compare():
    su.need("qemu-img", "qemu-io", "qemu-nbd")
    rnd = random.Random(21)
    d = h.tmpdir("vm")
    img = os.path.join(d, "disk.qcow2")
    ref = os.path.join(d, "ref.qcow2")
    h.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "128M"], timeout=20, check=True)
    for pat, off, ln in ((0x11, 0, 65536), (0x22, 5 * MiB + 512, 3 * MiB), (0x33, 127 * MiB, MiB),
                         (0x44, 64 * MiB + 4096, 4096)):
        h.run(["qemu-io", "-f", "qcow2", "-c", "write -P %d %d %d" % (pat, off, ln), img],
              timeout=20, check=True)
    h.run(["cp", img, ref], timeout=20, check=True)
    woff, wdata = 33 * MiB + 12345, rnd.randbytes(MiB + 3)
    with h.Mount(os.path.join(h.tmpdir("mp"), "disk.raw"), _qemu_target(img)) as m:
        r = h.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", m.export, ref], timeout=60)
        h.check_eq(r.returncode, 0, "qemu-img compare mounted raw vs qcow2 source (%s%s)"
                   % (r.stdout, r.stderr))
        h.check("identical" in r.stdout, "qemu-img compare output: %r" % r.stdout)
        fd = os.open(m.export, os.O_RDWR)
        try:
            h.pwrite_full(fd, wdata, woff)
            os.fsync(fd)
        finally:
            os.close(fd)
        r = h.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", m.export, ref], timeout=60)
        h.check_eq(r.returncode, 1, "qemu-img compare after a write must report a difference (%s%s)"
                   % (r.stdout, r.stderr))
    # after unmount (qemu-nbd stopped), the qcow2 holds exactly source + write
    shadow = os.path.join(d, "shadow.raw")
    h.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", ref, shadow], timeout=60, check=True)
    with open(shadow, "r+b") as f:
        f.seek(woff)
        f.write(wdata)
    r = h.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, shadow], timeout=60)
    h.check_eq(r.returncode, 0, "qcow2 after writes through the bridge vs expected raw (%s%s)"
               % (r.stdout, r.stderr))
    r = h.run(["qemu-img", "check", "-f", "qcow2", img], timeout=60)
    h.check_eq(r.returncode, 0, "qemu-img check (%s%s)" % (r.stdout, r.stderr))


def test_partition_ext4_end_to_end():
    su.need("qemu-img", "qemu-nbd", "parted", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount")
    if os.geteuid() != 0:
        raise h.SkipTest("needs root (losetup, mount)")
    rnd = random.Random(22)
    d = h.tmpdir("vm")
    img = os.path.join(d, "disk.qcow2")
    h.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "256M"], timeout=20, check=True)
    fsdir = h.tmpdir("ext4")
    sums = None

    with h.Mount(os.path.join(h.tmpdir("mp"), "disk.raw"), _qemu_target(img)) as m:
        r = h.run(["parted", "-s", m.export, "mklabel", "gpt", "mkpart", "p", "ext4", "1MiB", "100%"],
                  timeout=60)
        h.check_eq(r.returncode, 0, "parted (%s%s)" % (r.stdout, r.stderr))
        dev = None
        try:
            dev = _losetup(m.export)
            h.check_eq(_loop_backing(dev), m.export, "loop backing file")
            part = _partition(dev)
            r = h.run(["mkfs.ext4", "-q", "-F", part], timeout=60)
            h.check_eq(r.returncode, 0, "mkfs.ext4 (%s%s)" % (r.stdout, r.stderr))
            r = h.run(["mount", part, fsdir], timeout=30)
            h.check_eq(r.returncode, 0, "mount ext4 (%s)" % r.stderr.strip())
            try:
                sums = _write_files(fsdir, rnd)
                h.run(["sync", "-f", fsdir], timeout=60, check=True)
                _check_files(fsdir, sums, "same mount")
            finally:
                _umount(fsdir)
            # fresh mount: file data comes back from the disk (through the bridge)
            h.run(["blockdev", "--flushbufs", part], timeout=30)
            r = h.run(["mount", part, fsdir], timeout=30)
            h.check_eq(r.returncode, 0, "remount ext4 (%s)" % r.stderr.strip())
            try:
                _check_files(fsdir, sums, "after remount")
            finally:
                _umount(fsdir)
            r = h.run(["e2fsck", "-f", "-n", part], timeout=60)
            h.check_eq(r.returncode, 0, "e2fsck -f -n (%s%s)" % (r.stdout, r.stderr))
        finally:
            _umount(fsdir)
            _detach(dev)

    # everything is in the qcow2: serve it again with a new qemu-nbd and bridge
    r = h.run(["qemu-img", "check", "-f", "qcow2", img], timeout=60)
    h.check_eq(r.returncode, 0, "qemu-img check (%s%s)" % (r.stdout, r.stderr))
    with h.Mount(os.path.join(h.tmpdir("mp"), "disk.raw"), _qemu_target(img), opts=["-r"]) as m:
        dev = None
        try:
            dev = _losetup(m.export, readonly=True)
            part = _partition(dev)
            r = h.run(["e2fsck", "-f", "-n", part], timeout=60)
            h.check_eq(r.returncode, 0, "e2fsck after the remount cycle (%s%s)" % (r.stdout, r.stderr))
            r = h.run(["mount", "-o", "ro", part, fsdir], timeout=30)
            h.check_eq(r.returncode, 0, "read-only mount ext4 (%s)" % r.stderr.strip())
            try:
                _check_files(fsdir, sums, "after a new qemu-nbd and bridge")
            finally:
                _umount(fsdir)
        finally:
            _umount(fsdir)
            _detach(dev)


if __name__ == "__main__":
    h.main(globals())
