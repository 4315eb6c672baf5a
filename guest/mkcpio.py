#!/usr/bin/env python3
"""Writes a newc cpio archive of a staging directory plus a /dev/console node (no root needed)."""
import os, stat, sys

def entry(out, ino, name, mode, data=b"", rdev=(0, 0), nlink=1):
    name_b = name.encode() + b"\0"
    hdr = "070701" + "".join(f"{v:08x}" for v in (
        ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0))
    out.write(hdr.encode()); out.write(name_b)
    out.write(b"\0" * ((4 - (110 + len(name_b)) % 4) % 4))
    out.write(data); out.write(b"\0" * ((4 - len(data) % 4) % 4))

def main(stage, dst):
    with open(dst, "wb") as out:
        ino = 1
        for root, dirs, files in os.walk(stage):
            dirs.sort(); files.sort()
            rel = os.path.relpath(root, stage)
            if rel != ".":
                entry(out, ino, rel, stat.S_IFDIR | 0o755, nlink=2); ino += 1
            for f in files:
                p = os.path.join(root, f)
                name = os.path.normpath(os.path.join(rel, f))
                with open(p, "rb") as fh:
                    data = fh.read()
                entry(out, ino, name, stat.S_IFREG | (os.stat(p).st_mode & 0o777), data); ino += 1
        entry(out, ino, "dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)); ino += 1
        entry(out, ino, "TRAILER!!!", 0)

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
