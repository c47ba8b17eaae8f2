"""Final-answer extraction from a model completion.

Only two sources are used: the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (any nesting depth) and, when
enabled, an explicit "the answer is ..." sentence. There is deliberately no last-number fallback: a policy must not
be rewarded for a number that merely happens to appear at the end of its text.

Everything here is a single linear scan, so megabyte-long or deeply nested inputs cost time proportional to their
length and nothing more.
"""

from __future__ import annotations

import re

__all__ = ["extract_answer", "extract_last_boxed", "extract_answer_is"]

# Tokens that matter for brace matching. ``\\\\`` (a LaTeX line break) and escaped braces are consumed as whole
# tokens so that they never count as group delimiters. Alternation of fixed strings: no backtracking blow-up.
_TOKEN = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])\s*|\\\\|\\[{}]|[{}]")
_MAX_UNWRAP = 8
_MAX_ANSWER_IS_CHARS = 400
_ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)


def _bare_box_argument(text: str, start: int) -> str | None:
    """Reads the argument of ``\\boxed 5`` (no braces): the run of characters up to whitespace or ``$``."""
    end = start
    limit = min(len(text), start + _MAX_ANSWER_IS_CHARS)
    while end < limit and not text[end].isspace() and text[end] != "$":
        end += 1
    return text[start:end] if end > start else None


def extract_last_boxed(text: str) -> str | None:
    """Returns the content of the last complete ``\\boxed{...}`` or ``\\fbox{...}`` in ``text``.

    "Last" means the box whose closing brace comes last, so for ``\\boxed{\\boxed{5}}`` the outer box wins and is
    then unwrapped. Unterminated boxes (e.g. a truncated completion) are ignored.

    Args:
        text: the completion (untrusted, any length).

    Returns:
        The stripped box content, or ``None`` when the text has no complete box.
    """
    if "\\boxed" not in text and "\\fbox" not in text:
        return None
    stack: list[int] = []  # for each open brace: content start if it opens a box, else -1
    best: tuple[int, str] | None = None  # (end position, content)
    pending_box = False
    pending_pos = 0
    for match in _TOKEN.finditer(text):
        token = match.group()
        if pending_box and match.start() != pending_pos:
            # ``\boxed`` not directly followed by ``{``: the ``\boxed 5`` form.
            arg = _bare_box_argument(text, pending_pos)
            if arg is not None and (best is None or pending_pos + len(arg) >= best[0]):
                best = (pending_pos + len(arg), arg)
            pending_box = False
        if token[0] == "\\" and token[1:2] in ("b", "f"):
            if pending_box:  # ``\boxed\boxed``: the first one has no argument of its own
                pending_box = False
            pending_box = True
            pending_pos = match.end()
            continue
        if token == "{":
            stack.append(match.end() if pending_box and match.start() == pending_pos else -1)
            pending_box = False
        elif token == "}":
            pending_box = False
            if stack:
                content_start = stack.pop()
                if content_start >= 0:
                    best = (match.start(), text[content_start : match.start()])
        else:  # escaped brace or ``\\``
            pending_box = False
    if pending_box:
        arg = _bare_box_argument(text, pending_pos)
        if arg is not None and (best is None or pending_pos + len(arg) >= best[0]):
            best = (pending_pos + len(arg), arg)
    if best is None:
        return None
    content = best[1].strip()
    for _ in range(_MAX_UNWRAP):  # ``\boxed{\boxed{5}}`` -> ``5``
        inner = _whole_box_content(content)
        if inner is None:
            break
        content = inner
    return content


def _whole_box_content(text: str) -> str | None:
    """Returns the argument of ``text`` when all of ``text`` is one ``\\boxed{...}``/``\\fbox{...}``."""
    for command in ("\\boxed", "\\fbox"):
        if text.startswith(command):
            rest = text[len(command) :].lstrip()
            break
    else:
        return None
    if not rest.startswith("{") or not rest.endswith("}"):
        return None
    depth = 0
    i = 0
    while i < len(rest):
        char = rest[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i].strip() if i == len(rest) - 1 else None
        i += 1
    return None


def extract_answer_is(text: str) -> str | None:
    """Returns the answer stated in the last "the answer is ..." sentence, if any.

    The answer runs to the end of its line (at most a few hundred characters); surrounding ``$``/``\\(\\)``
    delimiters and a trailing full stop are removed.

    Args:
        text: the completion (untrusted, any length).

    Returns:
        The stated answer, or ``None``.
    """
    last = None
    for last in _ANSWER_IS.finditer(text):
        pass
    if last is None:
        return None
    tail = text[last.end() : last.end() + _MAX_ANSWER_IS_CHARS]
    tail = tail.split("\n", 1)[0].strip().lstrip(":").strip()
    if tail.startswith("$"):
        closing = tail.find("$", 1) if not tail.startswith("$$") else tail.find("$$", 2)
        if closing > 0:
            tail = tail[: closing + (2 if tail.startswith("$$") else 1)]
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if tail.startswith(left) and tail.endswith(right) and len(tail) >= len(left) + len(right):
            tail = tail[len(left) : len(tail) - len(right)]
            break
    tail = tail.strip().rstrip(".").strip()
    return tail or None


def extract_answer(text: str, answer_is_fallback: bool = False) -> str | None:
    """Extracts the final answer of a completion.

    Args:
        text: the completion (untrusted).
        answer_is_fallback: also accept an explicit "the answer is ..." when there is no box.

    Returns:
        The answer string, or ``None`` when nothing was found.
    """
    boxed = extract_last_boxed(text)
    if boxed is not None:
        return boxed
    if answer_is_fallback:
        return extract_answer_is(text)
    return None
