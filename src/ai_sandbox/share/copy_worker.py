"""The unprivileged half of the copy-mode sync-back, run as `python -m ai_sandbox.share.copy_worker`.

`extract UID GID DIR` reads DIR/image.ro into DIR/tree (see `ext4read`); `merge UID GID WORKSPACE DIR STAMP`
merges DIR/ex/tree into WORKSPACE against DIR/start.json. The process opens the directories it was given, then
drops to UID:GID (supplementary groups cleared; real, effective and saved ids all set; checked that root cannot be
regained) before it reads or writes anything in them, and works relative to those fds from then on: the user it
becomes need not be able to reach them by path (a state directory under /root, say).
The result goes to stdout as one line of ASCII JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Imported before the drop: the interpreter's own files may be readable by root only (a pyenv under /root).
from ai_sandbox import privileges
from ai_sandbox.share import copy, ext4read

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def main(argv: list[str]) -> int:
    verb, uid, gid, *rest = argv
    if verb == "merge":
        fds = [os.open(rest[0], _DIR), os.open(rest[1], _DIR | os.O_NOFOLLOW)]  # the workspace path may be a link
    else:
        fds = [os.open(rest[0], _DIR | os.O_NOFOLLOW)]
    privileges.drop_to(int(uid), int(gid))

    if verb == "extract":
        os.umask(0o077)
        os.fchdir(fds[0])
        result = ext4read.extract(Path("image.ro"), Path("."), Path("tree"))
        out: dict = {"skipped": result.skipped, "files": result.files, "bytes": result.bytes_written}
    elif verb == "merge":
        os.umask(0o022)
        os.fchdir(fds[1])
        ex = os.open("ex", _DIR | os.O_NOFOLLOW)
        tree = os.open("tree", _DIR | os.O_NOFOLLOW, dir_fd=ex)
        report = copy.merge(fds[0], tree, copy.load_manifest(Path("start.json")), stamp=rest[2])
        out = {"copied": report.copied, "deleted": report.deleted, "conflicts": report.conflicts,
               "skipped": report.skipped}
    else:
        raise SystemExit(f"unknown verb {verb}")
    sys.stdout.write(json.dumps(out) + "\n")  # ensure_ascii: undecodable names survive as \udcXX escapes
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
