"""Private helpers behind :class:`components.verifiers.SympyMathVerifier`.

The pipeline is split by concern:

* :mod:`.extract` finds the final answer in a completion (last ``\\boxed{}``/``\\fbox{}``).
* :mod:`.normalize` canonicalises LaTeX answer strings (no sympy, bounded regexes only).
* :mod:`.structure` splits an answer into a gold-guided shape (tuple, interval, set, matrix, equation, ...).
* :mod:`.numeric` parses plain numbers exactly (``fractions.Fraction``) for the in-process fast path.
* :mod:`.parse` turns LaTeX into sympy through the ANTLR grammar parser, behind size guards.
* :mod:`.compare` decides equivalence, gold-guided, either fast-only or with sympy.
* :mod:`.pool` runs the sympy work in killable worker processes with a hard wall-clock timeout.
"""
