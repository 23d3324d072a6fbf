"""An example difforge plugin (see its README)."""
