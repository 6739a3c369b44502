#!/usr/bin/env python3
"""Writes hand-made seed inputs into fuzz/corpus/<target>/seed-*: valid requests, packets, frames,
tar streams and image layouts in each target's input format (see the comment at the top of each target),
so that the fuzzers start from deep paths. The corpora committed are these plus what the fuzzers found,
minimised with `cargo fuzz cmin`. Rerunning this is harmless (same names, same bytes).

vsock_muxer has no seeds: its input is `arbitrary`'s encoding of an operation list, which the fuzzer
explores from scratch within seconds.
"""

import gzip
import hashlib
import io
import os
import struct
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# ---- split virtqueue in guest memory (16 entries: descriptors 0x0, avail 0x100, used 0x128) ----

NEXT, WRITE, INDIRECT = 1, 2, 4


class Memory:
    def __init__(self, size=0x1000):
        self.b = bytearray(size)
        self.avail_idx = 0

    def put(self, addr, data):
        end = addr + len(data)
        if end > len(self.b):
            self.b.extend(bytes(end - len(self.b)))
        self.b[addr:end] = data

    def desc(self, i, addr, length, flags, nxt=0, table=0):
        self.put(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def chain(self, first, descs):
        """descs: (addr, len, flags); descriptors first, first+1, ... linked; made available."""
        for k, (addr, length, flags) in enumerate(descs):
            last = k == len(descs) - 1
            self.desc(first + k, addr, length, flags | (0 if last else NEXT), 0 if last else first + k + 1)
        self.put(0x100 + 4 + 2 * (self.avail_idx % 16), struct.pack("<H", first))
        self.avail_idx += 1
        self.put(0x100 + 2, struct.pack("<H", self.avail_idx))

    def bytes(self):
        return bytes(self.b)


def blk_header(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)


def block_seeds():
    T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
    # one request of each kind
    for name, kind, data_flags, n in [
        ("read", T_IN, WRITE, 1024),
        ("write", T_OUT, 0, 512),
        ("flush", T_FLUSH, 0, 0),
        ("get-id", T_GET_ID, WRITE, 20),
        ("unsupported", 0x1234, 0, 0),
    ]:
        m = Memory()
        m.put(0x400, blk_header(kind, 2))
        descs = [(0x400, 16, 0)]
        if n:
            descs.append((0x800, n, data_flags))
        descs.append((0x500, 1, WRITE))
        m.chain(0, descs)
        for settings in (0, 1):
            put("virtio_block", f"{name}-{settings}", bytes([settings]) + m.bytes())
    # a batch: read, write, read crossing the 32 KiB region boundary, last sector
    m = Memory(0x800)
    m.put(0x400, blk_header(T_IN, 0))
    m.put(0x410, blk_header(T_OUT, 15))
    m.put(0x420, blk_header(T_IN, 15))
    m.chain(0, [(0x400, 16, 0), (0x7f00, 512, WRITE), (0x500, 1, WRITE)])
    m.chain(3, [(0x410, 16, 0), (0x600, 512, 0), (0x501, 1, WRITE)])
    m.chain(6, [(0x420, 16, 0), (0x20000, 512, WRITE), (0x502, 1, WRITE)])
    put("virtio_block", "batch", bytes([1 | 2]) + m.bytes())
    # an indirect table of three descriptors at 0x600
    m = Memory(0x800)
    m.put(0x400, blk_header(T_IN, 1))
    m.desc(0, 0x400, 16, NEXT, 1, table=0x600)
    m.desc(1, 0x800, 512, WRITE | NEXT, 2, table=0x600)
    m.desc(2, 0x500, 1, WRITE, 0, table=0x600)
    m.desc(0, 0x600, 48, INDIRECT)
    m.put(0x100 + 4, struct.pack("<H", 0))
    m.put(0x100 + 2, struct.pack("<H", 1))
    put("virtio_block", "indirect", bytes([0]) + m.bytes())


def vsock_header(op, length, src_port=49152, dst_port=1024, flags=0, src=3, dst=2):
    return struct.pack("<QQIIIHHIII", src, dst, src_port, dst_port, length, 1, op, flags, 256 * 1024, 0)


def vsock_packet_seeds():
    # tx: header + payload in one descriptor; rx: one buffer
    m = Memory()
    m.put(0x400, vsock_header(5, 5) + b"hello")
    m.chain(0, [(0x400, 49, 0)])
    m.chain(1, [(0x800, 0x200, WRITE)])
    put("vsock_packet", "single", m.bytes())
    # tx: header, then data in fragments; rx: header and data split
    m = Memory()
    m.put(0x400, vsock_header(5, 12) + b"fragmented!!")
    m.chain(0, [(0x400, 20, 0), (0x414, 24, 0), (0x42c, 6, 0), (0x432, 6, 0)])
    m.chain(4, [(0x800, 44, WRITE), (0x900, 0x100, WRITE)])
    put("vsock_packet", "fragments", m.bytes())
    # a request, a shutdown, a bad address, a length that lies
    m = Memory()
    m.put(0x400, vsock_header(1, 0))
    m.put(0x440, vsock_header(4, 0, flags=3))
    m.put(0x480, vsock_header(5, 0, dst=7))
    m.put(0x4c0, vsock_header(5, 100) + b"short")
    m.chain(0, [(0x400, 44, 0)])
    m.chain(1, [(0x800, 44, WRITE)])
    m.chain(2, [(0x440, 44, 0)])
    m.chain(3, [(0x880, 60, WRITE)])
    m.chain(4, [(0x480, 44, 0)])
    m.chain(5, [(0x900, 43, WRITE)])
    m.chain(6, [(0x4c0, 49, 0)])
    put("vsock_packet", "mixed", m.bytes())


# ---- protocol frames ----

def frame(kind, payload):
    return struct.pack("<IB", len(payload), kind) + payload


def blist(items):
    return struct.pack("<I", len(items)) + b"".join(struct.pack("<I", len(i)) + i for i in items)


def protocol_seeds():
    run = (blist([b"/bin/sh", b"-c", b"make"]) + blist([b"PATH=/bin", b"HOME=/root"]) + struct.pack("<I", 4)
           + b"/src" + struct.pack("<II", 1000, 1000) + blist([b"/src"]) + blist([b"/src/out"]))
    guest = (frame(1, struct.pack("<I", 2)) + frame(2, struct.pack("<BQ", 3, 123456789))
             + frame(7, b"hello\n") + frame(8, b"oops\n") + frame(14, b"\0" * 64) + frame(15, b"")
             + frame(16, b"/x: gone") + frame(11, b"\x01not found") + frame(9, struct.pack("<i", 2))
             + frame(10, struct.pack("<i", 9)))
    host = (frame(3, run) + frame(4, b"input") + frame(5, b"") + frame(6, struct.pack("<i", 15))
            + frame(12, b"tar bytes") + frame(13, b""))
    for piece in (0, 6, 255):
        put("protocol_frames", f"guest-{piece}", bytes([piece]) + guest)
        put("protocol_frames", f"host-{piece}", bytes([piece]) + host)
    put("protocol_frames", "too-large", bytes([3]) + struct.pack("<IB", (1 << 20) + 1, 7))
    put("protocol_frames", "truncated", bytes([3]) + frame(2, b"\x03\x01"))


# ---- tar streams ----

def tar_bytes(build, fmt=tarfile.GNU_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        build(t)
    return buf.getvalue()


def add(t, name, kind=tarfile.REGTYPE, data=b"", mode=0o644, link="", pax=None, uid=0, gid=0):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = 1_700_000_000
    info.linkname = link
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    if pax:
        info.pax_headers = pax
    t.addfile(info, io.BytesIO(data) if info.size else None)


def tree(t):
    add(t, "etc/", tarfile.DIRTYPE, mode=0o755)
    add(t, "etc/hosts", data=b"127.0.0.1 localhost\n")
    add(t, "usr/bin/tool", data=b"#!/bin/sh\necho\n", mode=0o4755, uid=1000, gid=1000)
    add(t, "usr/bin/alias", tarfile.LNKTYPE, link="usr/bin/tool")
    add(t, "usr/lib", tarfile.SYMTYPE, link="../lib")
    add(t, "dev/null", tarfile.CHRTYPE)
    add(t, "run/fifo", tarfile.FIFOTYPE)
    add(t, "a/" + "long-name-" * 12 + "/file", data=b"long")


def whiteouts(t):
    add(t, "etc/.wh.passwd")
    add(t, "tmp/.wh..wh..opq")
    add(t, "usr/bin/.wh.ash")
    add(t, ".wh..wh.plnk")
    add(t, "new/file", data=b"new")


def hostile(t):
    add(t, "../escape", data=b"x")
    add(t, "/abs", data=b"x")


def through_links(t):
    add(t, "escape/file", data=b"x")
    add(t, "bin/sh2", data=b"x")
    add(t, "hard", tarfile.LNKTYPE, link="../outside")


def pax_things(t):
    add(t, "xattr", data=b"x", pax={"SCHILY.xattr.user.test": "value", "mtime": "1700000000.5"})
    add(t, "caps", data=b"x", pax={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02"})
    add(t, "neg", data=b"x", pax={"mtime": "-1.25"})


def layer_input(settings, data, split=0):
    return bytes([settings]) + struct.pack("<H", split) + data


def tar_seeds():
    layers = {
        "tree": tar_bytes(tree),
        "whiteouts": tar_bytes(whiteouts),
        "hostile": tar_bytes(hostile),
        "through-links": tar_bytes(through_links),
        "pax": tar_bytes(pax_things, tarfile.PAX_FORMAT),
        "v7": tar_bytes(lambda t: (add(t, "olddir/", data=b""), add(t, "olddir/f", data=b"v7")),
                        tarfile.USTAR_FORMAT),
    }
    for name, data in layers.items():
        put("tar_layer", name, layer_input(1, data))
        put("tar_copy_out", name, bytes([8, 0]) + data)
    put("tar_layer", "gzip", layer_input(0, gzip.compress(layers["tree"], mtime=0)))
    two = layers["tree"] + layers["whiteouts"]
    put("tar_layer", "two-layers", layer_input(1 | 2, two, len(layers["tree"])))
    put("tar_copy_out", "replace", bytes([0, 0]) + tar_bytes(
        lambda t: (add(t, "existing", tarfile.DIRTYPE), add(t, "dir", data=b"file now"),
                   add(t, "link/x", data=b"x"), add(t, "abs", data=b"replaced"))))
    put("tar_copy_out", "failed", bytes([1, 1]) + layers["tree"][:700])
    put("tar_copy_out", "closed", bytes([1, 2]) + layers["tree"])


# ---- images ----

SEP = b"\n--8<--\n"


def image_seeds():
    layer = tar_bytes(tree)
    gz_layer = gzip.compress(layer, mtime=0)
    config = (b'{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"WorkingDir":"/src",'
              b'"User":"1000:1000","Entrypoint":["/bin/sh"],"Cmd":["-c","true"]},'
              b'"rootfs":{"type":"layers","diff_ids":["sha256:@3"]}}')
    manifest = (b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
                b'"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:@2","size":#2},'
                b'"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:@3","size":#3}]}')
    index = (b'{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",'
             b'"digest":"sha256:@1","size":#1,"platform":{"architecture":"amd64","os":"linux"}}]}')
    oci = index + SEP + manifest + SEP + config + SEP + layer
    for mode in (0, 1, 5, 8):
        put("oci_image", f"oci-{mode}", bytes([mode]) + oci)
    # a gzip layer: its diff_id is the sha256 of the uncompressed tar, which is document 4 (unused)
    gz_manifest = manifest.replace(b"vnd.oci.image.layer.v1.tar", b"vnd.oci.image.layer.v1.tar+gzip")
    gz_config = config.replace(b"@3", b"@4")
    put("oci_image", "oci-gzip-layer", bytes([0]) + index + SEP + gz_manifest + SEP + gz_config + SEP
        + gz_layer + SEP + layer)
    # a nested index with two platforms
    outer = (b'{"schemaVersion":2,"manifests":[{"digest":"sha256:@1","size":#1}]}')
    inner = (b'{"schemaVersion":2,"manifests":['
             b'{"digest":"sha256:@3","platform":{"architecture":"arm64","os":"linux"}},'
             b'{"digest":"sha256:@2","platform":{"architecture":"amd64","os":"linux"}}]}')
    m2 = manifest.replace(b"@2", b"@4").replace(b"#2", b"#4").replace(b"@3", b"@5").replace(b"#3", b"#5")
    c2 = config.replace(b"@3", b"@5")
    put("oci_image", "oci-nested", bytes([0]) + outer + SEP + inner + SEP + m2 + SEP + b"{}" + SEP + c2
        + SEP + layer)
    # docker save
    save = b'[{"Config":"blobs/sha256/@1","RepoTags":["app:1"],"Layers":["blobs/sha256/@2"]}]'
    dconfig = config.replace(b"@3", b"@2")
    for mode in (2, 6):
        put("oci_image", f"docker-save-{mode}", bytes([mode]) + save + SEP + dconfig + SEP + layer)
    # plain tarballs
    put("oci_image", "tarball", bytes([3]) + layer)
    put("oci_image", "tarball-gz", bytes([3]) + gz_layer)


# ---- MMIO register sequences (see mmio_transport.rs for the opcodes) ----

def mmio_seeds():
    def w(offset, value):
        return bytes([0, offset // 4]) + struct.pack("<I", value)

    def r(offset, width=2):
        return bytes([1, offset // 4, width])

    def mem(addr, data):
        out = b""
        for i in range(0, len(data), 255):
            chunk = data[i:i + 255]
            out += bytes([4]) + struct.pack("<H", addr + i) + bytes([len(chunk)]) + chunk
        return out

    def init(q_sizes_log2, bases):
        out = bytes([5, 0xff])
        for log2, (desc, avail, used) in zip(q_sizes_log2, bases):
            out += bytes([log2]) + struct.pack("<HHH", desc, avail, used)
        return out

    ident = r(0) + r(4) + r(8) + r(0xc) + w(0x14, 1) + r(0x10) + r(0x100, 3) + r(0x108, 2)
    # block: queue 0 of 16 entries at 0/0x100/0x128, one read request, a notification
    m = Memory()
    m.put(0x400, blk_header(0, 1))
    m.chain(0, [(0x400, 16, 0), (0x800, 512, WRITE), (0x500, 1, WRITE)])
    block = ident + init([4, 4, 4], [(0, 0x100, 0x128)] * 3) + mem(0, m.bytes()[:0x600]) + bytes([7, 0])
    put("mmio_transport", "block", bytes([0]) + block + r(0x60) + w(0x64, 1) + w(0x70, 0) + r(0x70))
    # vsock: three queues of 16 entries; a REQUEST on tx, an rx buffer
    m = Memory()
    m.put(0x400, vsock_header(1, 0))
    m.chain(0, [(0x400, 44, 0)])
    rx = Memory()
    rx.chain(0, [(0x800, 0x100, WRITE)])
    vsock = (ident + init([4, 4, 4], [(0x1000, 0x1100, 0x1128), (0, 0x100, 0x128), (0x2000, 0x2100, 0x2128)])
             + mem(0, m.bytes()[:0x600]) + mem(0x1000, rx.bytes()[:0x200]) + bytes([7, 1]) + bytes([7, 0]))
    put("mmio_transport", "vsock", bytes([1]) + vsock)
    # negotiation out of order, bad queue sizes, config writes, a reset in the middle
    odd = (w(0x70, 1) + w(0x70, 4) + w(0x70, 0) + w(0x70, 3) + w(0x20, 0xffffffff) + w(0x70, 0xb)
           + w(0x30, 0) + w(0x38, 3) + w(0x44, 1) + w(0x70, 0xf) + r(0x70)
           + bytes([2]) + struct.pack("<H", 0x102) + bytes([2]) + b"\x01\x02"
           + bytes([3]) + struct.pack("<H", 0x71) + bytes([3]) + w(0x50, 7))
    put("mmio_transport", "odd", bytes([0]) + odd)


if __name__ == "__main__":
    block_seeds()
    vsock_packet_seeds()
    protocol_seeds()
    tar_seeds()
    image_seeds()
    mmio_seeds()
