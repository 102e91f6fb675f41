"""fx rewrite passes: one pass per file."""
