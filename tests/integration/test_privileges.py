"""The one privilege drop: for good, checked, and with lazily imported modules loaded first."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SCRIPT = """
import os, sys
from ai_sandbox import privileges
privileges.drop_to(65534, 65534, packages=("asyncssh",))
assert os.getresuid() == (65534,) * 3 and os.getresgid() == (65534,) * 3 and os.getgroups() == []
try:
    os.setuid(0)
except PermissionError:
    pass
else:
    raise SystemExit("regained root")
import uuid, secrets, encodings.idna, asyncssh.sftp  # loaded before the drop: no file read needed now
print("ok", "asyncssh.sftp" in sys.modules)
"""


def test_drop_is_for_good_and_lazy_modules_were_loaded_before():
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["ok", "True"]


def test_no_drop_for_root_owned_work():
    res = subprocess.run([sys.executable, "-c", "import os\nfrom ai_sandbox import privileges\n"
                          "privileges.drop_to(0, 0)\nprint(os.geteuid())"], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == str(os.geteuid())
