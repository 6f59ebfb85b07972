"""Returning freed memory to the operating system.

glibc keeps freed heap pages for reuse, so a process that once tokenized a large text (hundreds of
MB of short-lived objects) or read a dense block keeps that much resident memory for good. For a
pipeline whose point is a small footprint that matters: `trim_heap()` asks glibc to give the free
pages back (malloc_trim); elsewhere it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys


def trim_heap() -> bool:
    """Release free heap memory to the OS (glibc); returns whether anything was released."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):      # not glibc (musl has no malloc_trim)
        return False
