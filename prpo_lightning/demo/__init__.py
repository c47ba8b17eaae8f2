"""The offline embedded demo: a synthetic arithmetic task and builtin warm-started policies."""
