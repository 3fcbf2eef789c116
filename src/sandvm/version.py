"""sandvm's version, in a leaf of its own: the package root, the server, the sandbox and
the remote SDK read it without importing each other (or the package root)."""

__version__ = "0.1.0"
