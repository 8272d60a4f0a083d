"""Tests for difydaemon.heap: returning the heap's free pages to the system."""

from __future__ import annotations

import ctypes

from difydaemon.heap import release_free_heap
from difydaemon.testing.cases import SynchronousTestCase


class FakeLibc:
    """A C library whose ``malloc_trim`` records its padding and answers ``result``."""

    def __init__(self, result: int) -> None:
        self.calls = []
        self.result = result

    def malloc_trim(self, pad):
        self.calls.append(pad)
        return self.result


class ReleaseFreeHeapTests(SynchronousTestCase):
    """``malloc_trim(0)`` where the C library has it; nothing elsewhere."""

    def test_trims_without_padding(self):
        """The whole free heap is asked for (padding 0); the answer says whether memory went back."""
        for result, released in ((1, True), (0, False)):
            libc = FakeLibc(result)
            self.assertIs(release_free_heap(libc), released)
            self.assertEqual(libc.calls, [0])

    def test_no_malloc_trim(self):
        """A C library without malloc_trim (musl, macOS) is left alone."""
        self.assertFalse(release_free_heap(object()))

    def test_real_heap(self):
        """On glibc, freed blocks below one still in use are returned: their pages were resident for nothing."""
        if getattr(ctypes.CDLL(None), "malloc_trim", None) is None:
            self.skipTest("no malloc_trim in this C library")
        # blocks past pymalloc's 512 bytes come from malloc; the last one
        # kept holds the heap's top above the freed ones
        blocks = [bytes(4096) for _ in range(4096)]
        kept = blocks.pop()
        del blocks
        self.assertTrue(release_free_heap())
        self.assertEqual(len(kept), 4096)
