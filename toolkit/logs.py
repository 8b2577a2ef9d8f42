"""Logging goes to stderr so stdout carries only what a script would pipe on."""

import logging
import os
import sys


def setup(level: str | None = None) -> None:
    level = level or os.environ.get("TOOLKIT_LOG", "INFO")
    root = logging.getLogger()
    root.handlers.clear()
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(h)
    root.setLevel(level)
    for noisy in ("jax", "absl", "orbax", "httpx", "httpcore", "asyncio", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
