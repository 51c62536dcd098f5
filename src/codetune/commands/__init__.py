"""One function per ``codetune`` command: argument checks, loading, the work, writing results."""
