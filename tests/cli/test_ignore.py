"""Tests for the gitignore-syntax rules of ``dify plugin package``."""

from __future__ import annotations

from difydaemon.cli.ignore import parse_ignore, parse_rule
from difydaemon.testing.cases import SynchronousTestCase


class IgnoreRuleTests(SynchronousTestCase):
    """One pattern at a time."""

    def test_comments_and_blank_lines(self):
        """Comment and blank lines make no rule; an escaped # is a pattern."""
        self.assertIsNone(parse_rule("# a comment"))
        self.assertIsNone(parse_rule("   "))
        rules = parse_ignore("\\#notes\n")
        self.assertTrue(rules.is_ignored("#notes", is_dir=False))

    def test_unanchored_name_matches_at_any_depth(self):
        """A pattern without a slash matches a file of that name in any directory."""
        rules = parse_ignore("secret.txt\n")
        self.assertTrue(rules.is_ignored("secret.txt", is_dir=False))
        self.assertTrue(rules.is_ignored("a/b/secret.txt", is_dir=False))
        self.assertFalse(rules.is_ignored("a/secret.txt.bak", is_dir=False))

    def test_anchored_pattern(self):
        """A leading or inner slash anchors the pattern to the plugin directory."""
        rules = parse_ignore("/build\ndocs/*.md\n")
        self.assertTrue(rules.is_ignored("build", is_dir=True))
        self.assertFalse(rules.is_ignored("src/build", is_dir=True))
        self.assertTrue(rules.is_ignored("docs/a.md", is_dir=False))
        self.assertFalse(rules.is_ignored("x/docs/a.md", is_dir=False))
        self.assertFalse(rules.is_ignored("docs/sub/a.md", is_dir=False))

    def test_directory_only(self):
        """A trailing slash matches directories only."""
        rules = parse_ignore("cache/\n")
        self.assertTrue(rules.is_ignored("cache", is_dir=True))
        self.assertTrue(rules.is_ignored("a/cache", is_dir=True))
        self.assertFalse(rules.is_ignored("cache", is_dir=False))

    def test_globs(self):
        """``*`` and ``?`` stay within one path part; classes and negated classes work."""
        rules = parse_ignore("*.py[cod]\nlog?.txt\nfile[!0-9].bin\n")
        self.assertTrue(rules.is_ignored("a/b/x.pyc", is_dir=False))
        self.assertFalse(rules.is_ignored("x.py", is_dir=False))
        self.assertTrue(rules.is_ignored("log1.txt", is_dir=False))
        self.assertFalse(rules.is_ignored("log12.txt", is_dir=False))
        self.assertTrue(rules.is_ignored("filea.bin", is_dir=False))
        self.assertFalse(rules.is_ignored("file1.bin", is_dir=False))

    def test_double_star(self):
        """``**/`` matches any number of directories, ``/**`` everything inside."""
        rules = parse_ignore("**/tmp/*.log\nout/**\na/**/z\n")
        self.assertTrue(rules.is_ignored("tmp/x.log", is_dir=False))
        self.assertTrue(rules.is_ignored("p/q/tmp/x.log", is_dir=False))
        self.assertTrue(rules.is_ignored("out/deep/file", is_dir=False))
        self.assertTrue(rules.is_ignored("a/z", is_dir=False))
        self.assertTrue(rules.is_ignored("a/b/c/z", is_dir=False))
        self.assertFalse(rules.is_ignored("b/z", is_dir=False))

    def test_negation_last_match_wins(self):
        """A later ``!`` pattern re-includes what an earlier one excluded, and the other way round."""
        rules = parse_ignore("*.md\n!README.md\ndocs/README.md\n")
        self.assertTrue(rules.is_ignored("NOTES.md", is_dir=False))
        self.assertFalse(rules.is_ignored("README.md", is_dir=False))
        self.assertTrue(rules.is_ignored("docs/README.md", is_dir=False))

    def test_trailing_spaces(self):
        """Trailing spaces are dropped unless escaped."""
        self.assertTrue(parse_ignore("name   \n").is_ignored("name", is_dir=False))
        self.assertTrue(parse_ignore("name\\ \n").is_ignored("name ", is_dir=False))
