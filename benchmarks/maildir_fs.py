"""What the file system charges for one Maildir copy (not a test: it prints figures).

Each line adds one step of ``MaildirDelivery`` (adapters/maildir.py) to the
one before: create, write and close a file in ``tmp/``; rename it into
``new/``; ``fsync`` the file before the rename; ``fsync`` the ``new/``
folder after it (what ``serve`` does before its 250). The CPU is this
process's, user and system (``getrusage``), per copy; "wall" includes the
waits for the disk. On the project's VM (ext4 on virtio, mounted with
``discard``) the system time of the whole sequence is most of what a
delivered message costs ``serve`` beyond its Python work.

    python benchmarks/maildir_fs.py --copies 500 --folder /var/tmp
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time


def _now() -> tuple[float, float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, time.perf_counter()


def run(folder: str, copies: int, size: int) -> None:
    root = tempfile.mkdtemp(prefix="maildir-fs-", dir=folder)
    try:
        os.makedirs(os.path.join(root, "tmp"))
        os.makedirs(os.path.join(root, "new"))
        data = b"x" * size
        steps = [
            ("create, write, close", False, False, False),
            ("+ rename into new/", True, False, False),
            ("+ fsync the file", True, True, False),
            ("+ fsync new/ (serve)", True, True, True),
        ]
        print(f"{copies} copies of {size} bytes in {root}, per copy (µs):")
        for label, rename, sync_file, sync_dir in steps:
            before = _now()
            for i in range(copies):
                name = f"{label[:6].strip()}{i}"
                tmp = os.path.join(root, "tmp", name)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, data)
                if sync_file:
                    os.fsync(fd)
                os.close(fd)
                if rename:
                    os.rename(tmp, os.path.join(root, "new", name))
                if sync_dir:
                    dfd = os.open(os.path.join(root, "new"), os.O_RDONLY | os.O_DIRECTORY)
                    os.fsync(dfd)
                    os.close(dfd)
            after = _now()
            user, system, wall = (
                (a - b) / copies * 1e6 for a, b in zip(after, before, strict=True)
            )
            print(f"  {label:<24} user {user:5.0f}  system {system:5.0f}  wall {wall:6.0f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=500)
    parser.add_argument("--size", type=int, default=1300, help="bytes a copy (default 1300)")
    parser.add_argument("--folder", default=None, help="where (default: the temporary folder)")
    args = parser.parse_args()
    run(args.folder or tempfile.gettempdir(), args.copies, args.size)


if __name__ == "__main__":
    main()
