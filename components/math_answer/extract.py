"""Final-answer extraction from a model completion.

Only two sources are used: the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (any nesting depth) and, when
enabled, an explicit "the answer is ..." sentence. There is deliberately no last-number fallback: a policy must not
be rewarded for a number that merely happens to appear at the end of its text.

Everything here is a single linear scan, so megabyte-long or deeply nested inputs cost time proportional to their
length and nothing more.
"""

from __future__ import annotations

import re

__all__ = ["extract_answer", "extract_last_boxed", "extract_final_boxes", "extract_answer_is", "MAX_BOX_GAP"]

# Tokens that matter for brace matching. ``\\\\`` (a LaTeX line break) and escaped braces are consumed as whole
# tokens so that they never count as group delimiters. Alternation of fixed strings: no backtracking blow-up.
_TOKEN = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])\s*|\\\\|\\[{}]|[{}]")
_MAX_UNWRAP = 8
_MAX_ANSWER_IS_CHARS = 400
_ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)
MAX_BOX_GAP = 40
"""Boxes separated by at most this many characters of connecting text (``$x=\\boxed{2}$ or $x=\\boxed{5}$``) form one
final answer under the ``multiple_boxes="final"`` policy."""
_CONNECTING = re.compile(
    r"(?:\s|\$|\\[()]|[,;]|\\q?quad(?![a-zA-Z])|\\text\s*\{\s*(?:and|or)?\s*\}|(?<![a-zA-Z])(?:and|or)(?![a-zA-Z])"
    r"|(?<![a-zA-Z])[a-zA-Z]{1,2}(?:_\{?\w{1,2}\}?)?\s*=)*"
)
"""What may stand between two boxes of one final answer: delimiters, commas, "and"/"or" and names with ``=``."""
_MAX_FINAL_BOXES = 16


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


def _box_spans(text: str) -> list[tuple[int, int, str]]:
    """``(command start, closing brace end, content)`` of every braced box, outermost boxes only, in text order."""
    spans: list[tuple[int, int, str]] = []
    stack: list[tuple[int, int]] = []  # for each open brace: (content start, command start) of a box, else (-1, -1)
    pending: int | None = None
    pending_end = 0
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token[0] == "\\" and token[1:2] in ("b", "f"):
            pending, pending_end = match.start(), match.end()
            continue
        if token == "{":
            opens_box = pending is not None and match.start() == pending_end
            stack.append((match.end(), pending) if opens_box else (-1, -1))
        elif token == "}" and stack:
            content_start, command_start = stack.pop()
            if content_start >= 0:
                while spans and spans[-1][0] > command_start:  # boxes nested in this one
                    spans.pop()
                spans.append((command_start, match.end(), text[content_start : match.start()]))
        pending = None
    return spans


def extract_final_boxes(text: str) -> list[str]:
    """The boxes of the final answer: the last complete box and the boxes joined to it by connecting text only.

    Boxes belong to the final answer when each is followed by the next within :data:`MAX_BOX_GAP` characters of
    math delimiters, commas, "and"/"or" and names with ``=`` (``$x = \\boxed{2}$ or $x = \\boxed{5}$``,
    ``$a=\\boxed{3}$ and $b=\\boxed{4}$``). An earlier box in another sentence (an intermediate result, "\\boxed{0} was
    wrong, the answer is \\boxed{5}") is not part of it. Repeated identical boxes count once.

    Args:
        text: the completion (untrusted, any length).

    Returns:
        The box contents in text order (empty when the text has no complete braced box).
    """
    if "\\boxed" not in text and "\\fbox" not in text:
        return []
    spans = _box_spans(text)
    if not spans or "\\boxed" in text[spans[-1][1] :] or "\\fbox" in text[spans[-1][1] :]:
        return []  # no braced box, or a later unbraced ``\boxed 5`` is the last answer
    group = [spans[-1]]
    for span in reversed(spans[:-1]):
        gap = text[span[1] : group[0][0]]
        if len(gap) > MAX_BOX_GAP or not _CONNECTING.fullmatch(gap) or len(group) >= _MAX_FINAL_BOXES:
            break
        group.insert(0, span)
    contents: list[str] = []
    for _, _, content in group:
        content = content.strip()
        for _ in range(_MAX_UNWRAP):
            inner = _whole_box_content(content)
            if inner is None:
                break
            content = inner
        if content not in contents:
            contents.append(content)
    return contents


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


def extract_answer(text: str, answer_is_fallback: bool = False, final_boxes: bool = False) -> str | None:
    """Extracts the final answer of a completion.

    Args:
        text: the completion (untrusted).
        answer_is_fallback: also accept an explicit "the answer is ..." when there is no box.
        final_boxes: read several boxes of the final answer (:func:`extract_final_boxes`) as one list answer,
            their contents joined by ``", "``.

    Returns:
        The answer string, or ``None`` when nothing was found.
    """
    if final_boxes:
        boxes = extract_final_boxes(text)
        if len(boxes) > 1:
            return ", ".join(boxes)
    boxed = extract_last_boxed(text)
    if boxed is not None:
        return boxed
    if answer_is_fallback:
        return extract_answer_is(text)
    return None
