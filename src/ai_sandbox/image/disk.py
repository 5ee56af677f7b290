"""The `disk` stage and small disk helpers: ext4 images made with `mkfs.ext4 -d` (no mounting)."""

from __future__ import annotations

from pathlib import Path

from ai_sandbox import runner


def tree_size_mib(root: Path) -> int:
    out = runner.run(["du", "-s", "--block-size=1M", "--apparent-size", str(root)]).stdout
    return int(out.split()[0])


def make_ext4(image: Path, size_mib: int, label: str, tree: Path | None = None, log_file: Path | None = None) -> Path:
    """A sparse ext4 image of `size_mib` MiB labelled `label`, filled from `tree` if given."""
    image.parent.mkdir(parents=True, exist_ok=True)
    image.unlink(missing_ok=True)
    with image.open("wb") as fh:
        fh.truncate(size_mib * 1024 * 1024)
    argv = ["mkfs.ext4", "-q", "-F", "-L", label, "-E", "lazy_itable_init=1,lazy_journal_init=1", "-m", "0"]
    if tree is not None:
        argv += ["-d", str(tree)]
    runner.run([*argv, str(image)], log_file=log_file, timeout=1800)
    return image


def build_disk(root: Path, out: Path, label: str, headroom_mib: int, log_file: Path) -> Path:
    size = int(tree_size_mib(root) * 1.15) + headroom_mib
    return make_ext4(out / "rootfs.ext4", size, label, root, log_file)
