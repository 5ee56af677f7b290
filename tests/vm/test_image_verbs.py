"""`ai build inject-only|host-only` on the real minimal image re-run exactly their stages (clean and inner-only
are checked over stand-in builders in tests/unit/test_build_verbs.py: they cost a full rebuild here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

AI = str(Path(sys.executable).with_name("ai"))


def _build(*args: str) -> dict:
    out = subprocess.run([AI, "build", *args, "--image", "minimal", "--json"], capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_build_verbs_rerun_their_stages_for_real(minimal_image):
    assert _build()["ran"] == []
    inject = _build("inject-only")
    assert inject["ran"] == ["guest", "disk"]
    assert Path(inject["rootfs"]).stat().st_size > 0
    assert _build("host-only")["ran"] == ["kernel"]
    again = _build()
    assert again["ran"] == [] and again["rootfs"] == minimal_image["rootfs"]
