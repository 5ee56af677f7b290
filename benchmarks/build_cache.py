"""Image build: full build vs a no-change rebuild vs an inject-only rebuild, measured side by side in one run.

Usage (root, network to the Debian mirror): python benchmarks/build_cache.py [--image minimal]
Prints seconds and the ratios full/no-change and full/inject-only. Uses a fresh temporary cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

AI = str(Path(sys.executable).with_name("ai"))


def timed(*args: str) -> float:
    t0 = time.monotonic()
    subprocess.run([AI, "build", *args], check=True, capture_output=True)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default="minimal")
    image = ap.parse_args().image
    with tempfile.TemporaryDirectory(prefix="ai-bench-") as cache:
        os.environ["AI_SANDBOX_CACHE"] = cache
        extra = ["--skip-optional"] if image == "default" else []
        full = timed("--image", image, *extra)
        again = timed("--image", image, *extra)
        inject = timed("inject-only", "--image", image, *extra)
    print(json.dumps({
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "image": image,
        "full_s": round(full, 1), "no_change_s": round(again, 1), "inject_only_s": round(inject, 1),
        "full_over_no_change": round(full / again, 1), "full_over_inject_only": round(full / inject, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
