"""The corpora memlm generates itself (``facts``: real fact tables with a real long tail; ``bios``:
invented people asked about in words their documents never use), with their probe files.

Kept apart from ``memlm.data`` (which prepares any corpus): these are inputs that memlm makes for
its demo, its tests and its routing experiments, and they need their own data packages.
"""
