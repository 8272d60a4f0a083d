"""
Plugin management: stored packages, installations, install tasks.

The HTTP routes of ``http-api.md`` §2.4 are thin wrappers (``api/``) over
the classes here.
"""
