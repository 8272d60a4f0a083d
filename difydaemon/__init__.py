"""difydaemon: a Dify plugin daemon on Twisted."""

__version__ = "0.1.0"
