"""
Plugin packages: safe zip reading, checksums, signatures, and the
PluginDeclaration built from a package's YAML files.  Pure and synchronous;
callers put blocking work (extraction) in a thread.
"""
