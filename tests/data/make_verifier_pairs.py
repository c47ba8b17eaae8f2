"""Generates ``tests/data/verifier_pairs.jsonl``: (gold, candidate, equivalent) pairs for the verifier tests.

Pairs are derived from the MATH500 gold answers (``../shared/data/math500/test.jsonl`` next to the repository) by
rewrites that keep the value (reformatted fractions and decimals, ``\\dfrac`` vs ``\\frac``, reordered sets, units,
spacing, expanded vs factored forms, ...) and rewrites that change it (wrong numbers, swapped tuple entries, sign
flips, wrong brackets, ...), plus the public false-negative/false-positive cases from math-verify's issue tracker.

Every generated label is re-checked independently of the verifier under test: equivalents and non-equivalents are
evaluated with sympy (the gold is trusted input here) and a pair whose numeric check disagrees with its label is
dropped. The committed table is the reference; rerun with::

    python tests/data/make_verifier_pairs.py            # writes tests/data/verifier_pairs.jsonl
"""

from __future__ import annotations

import json
import random
import re
import sys
from fractions import Fraction
from pathlib import Path

HERE = Path(__file__).resolve().parent
MATH500 = HERE.parents[2] / "shared" / "data" / "math500" / "test.jsonl"
OUT = HERE / "verifier_pairs.jsonl"
MV = "https://github.com/huggingface/Math-Verify/issues/"

# (gold, candidate, equivalent, source): public cases from math-verify's tracker (anchors.md section 1.3).
PUBLIC_CASES = [
    ("2x+4y-3=0", "y = -\\frac{1}{2}x + \\frac{3}{4}", True, MV + "26"),
    ("e^{16}-1", "-1 + e^{16}", True, MV + "69"),
    ("e^{16}-1", "\\exp(16) - 1", True, MV + "69"),
    ("\\dfrac{\\pi}{2}", "\\pi/2", True, MV + "69"),
    ("14 - i", "14.0 - 1.0i", True, MV + "69"),
    ("14 - i", "14 + (-1)i", True, MV + "69"),
    ("-2\\pi", "-2 \\cdot \\pi", True, MV + "69"),
    ("\\text{13}", "13", True, MV + "37"),
    ("13", "\\text{13}", True, MV + "37"),
    ("\\frac{1}{2004!}", "\\frac{1}{2006!}", False, MV + "14"),
    ("\\frac{1}{2^{99}}", "\\frac{1}{2^{98}}", False, MV + "14"),
    ("n=2, 3, 4", "n=1, 2, 3", False, MV + "14"),
    ("D = (0, 1)", "D = (0, 1.5)", False, MV + "14"),
    ("F_n = \\sum_{k=0}^{n-1} F_k F_{n-k-1}", "F_n = \\sum_{k=0}^{n-2} F_k F_{n-k-2}", False, MV + "14"),
    ("19, 46, \\text{ and } 82", "21, 36, and 82", False, MV + "14"),
    ("\\frac{2^{2005}+1}{3 \\cdot 2^{2006}}", "\\frac{1}{3 \\cdot 2^{2006}}", False, MV + "14"),
    ("1 - \\frac{1}{\\mathrm{e}}", "1 + \\frac{1}{\\mathrm{e}}", False, MV + "14"),
    ("\\pm 2021", "2021", False, MV + "14"),
    ("12:00", "1:00", False, MV + "14"),
    ("1, 2, \\ldots, n", "1, 3, 5, \\ldots, 2n-1", False, MV + "14"),
    ("1:2:3:\\ldots", "1:4:9:\\ldots", False, MV + "14"),
    ("3x-1y+13=0", "3x + 4y + 14=0", False, MV + "60"),
]


def _sympy(latex: str):
    from latex2sympy2_extended import latex2sympy

    return latex2sympy(latex)


def _value(latex: str):
    """Trusted parse of a generated answer to sympy (generator only; golds and our own rewrites)."""
    return _sympy(latex)


def _numeric_equal(a: str, b: str) -> bool | None:
    """Independent label check by evaluation at random points; ``None`` when not checkable."""
    import sympy

    if any(marker in a + b for marker in ("\\text", "\\mbox")) or not re.search(r"[\d\\]", a + b):
        return None  # units and words are outside what evaluation can check
    try:
        x, y = _value(a), _value(b)
    except Exception:  # noqa: BLE001
        return None
    if not (isinstance(x, sympy.Expr) and isinstance(y, sympy.Expr)):
        return None
    symbols = sorted(x.free_symbols | y.free_symbols, key=str)
    rng = random.Random(0)
    for _ in range(3):
        point = {s: sympy.Rational(rng.randint(2, 40), rng.randint(1, 7)) for s in symbols}
        if sympy.Symbol("i") in point:
            point[sympy.Symbol("i")] = sympy.I
        try:
            d = complex(sympy.N((x - y).subs(point), 50))
            s = max(abs(complex(sympy.N(x.subs(point), 50))), 1e-300)
        except Exception:  # noqa: BLE001
            return None
        if abs(d) > 1e-12 * s:
            return False
    return True


def _plain_fraction(gold: str) -> Fraction | None:
    g = gold.replace("\\dfrac", "\\frac").replace(" ", "").replace("\\!", "").replace("\\$", "")
    if re.fullmatch(r"-?\d+", g) or re.fullmatch(r"-?\d*\.\d+", g):
        return Fraction(g)
    m = re.fullmatch(r"(-?)\\frac\{?(\d+)\}?\{?(\d+)\}?", g)
    if m and "{" in g:
        return (-1 if m.group(1) else 1) * Fraction(int(m.group(2)), int(m.group(3)))
    return None


def _frac_latex(q: Fraction) -> str:
    if q.denominator == 1:
        return str(q.numerator)
    sign = "-" if q < 0 else ""
    return f"{sign}\\frac{{{abs(q.numerator)}}}{{{q.denominator}}}"


def _decimal(q: Fraction) -> str | None:
    d = q.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d != 1:
        return None
    text = f"{float(q):.12f}".rstrip("0").rstrip(".")
    return text if Fraction(text) == q else None


def _with_commas(n: int) -> str:
    return f"{n:,}"


def number_rewrites(gold: str, q: Fraction, rng: random.Random) -> list[tuple[str, bool, str]]:
    out: list[tuple[str, bool, str]] = []
    dec = _decimal(q)
    if q.denominator != 1:
        out.append((_frac_latex(q).replace("\\frac", "\\dfrac"), True, "dfrac_vs_frac"))
        out.append((f"{q.numerator}/{q.denominator}", True, "fraction_reformatted"))
        if dec is not None:
            out.append((dec, True, "fraction_to_decimal"))
        else:
            out.append((f"{float(q):.3g}", False, "decimal_rounded_too_coarsely"))
        out.append((_frac_latex(Fraction(q.denominator, q.numerator)) if q != 0 else "1", False, "reciprocal"))
        if abs(q.numerator) != 1:
            out.append((_frac_latex(Fraction(q.numerator + 1, q.denominator)), False, "wrong_number"))
        out.append((f"\\frac{{{2 * q.numerator}}}{{{2 * q.denominator}}}", True, "unreduced_fraction"))
    else:
        n = q.numerator
        out.append((f"{n}.0", True, "integer_as_decimal"))
        if abs(n) >= 1000:
            out.append((_with_commas(n), True, "thousands_separator"))
            out.append((_with_commas(n).replace(",", "{,}"), True, "thousands_separator"))
        out.append((str(n + rng.choice([1, -1, 2, 10])), False, "wrong_number"))
        if abs(n) >= 10:
            digits = str(abs(n))
            swapped = digits[::-1]
            if swapped != digits and not swapped.startswith("0"):
                out.append((("-" if n < 0 else "") + swapped, False, "digits_reversed"))
        out.append((f"x = {n}", True, "assignment_stripped"))
        out.append((f"{n} \\text{{ units}}", True, "units_and_spacing"))
        if n != 0:
            out.append((str(n * 10), False, "wrong_number"))
    if q != 0:
        neg = _frac_latex(-q)
        out.append((neg, False, "sign_flip"))
    if dec is not None and "." in gold:
        out.append((_frac_latex(q), True, "decimal_to_fraction"))
        out.append((dec + "0", True, "trailing_zero"))
        shifted = Fraction(dec) + Fraction(1, 10 ** max(1, len(dec.split(".")[-1]) if "." in dec else 1))
        out.append((_decimal(shifted) or str(float(shifted)), False, "wrong_last_digit"))
    return out


def symbolic_rewrites(gold: str, rng: random.Random) -> list[tuple[str, bool, str]]:
    import sympy

    if "\\text" in gold or "\\mbox" in gold:
        return []  # units would be read as symbols
    try:
        expr = _value(gold)
    except Exception:  # noqa: BLE001
        return []
    if not isinstance(expr, sympy.Expr) or isinstance(expr, sympy.MatrixBase):
        return []
    out: list[tuple[str, bool, str]] = []
    out.append((gold.replace(" ", ""), True, "spacing"))
    if "\\frac" in gold:
        out.append((gold.replace("\\frac", "\\dfrac"), True, "dfrac_vs_frac"))
    if expr.free_symbols:
        expanded = sympy.expand(expr)
        factored = sympy.factor(expr)
        for alt, cat in ((expanded, "expanded_vs_factored"), (factored, "expanded_vs_factored")):
            latex = sympy.latex(alt)
            if latex.replace(" ", "") != gold.replace(" ", "") and sympy.srepr(alt) != sympy.srepr(expr):
                out.append((latex, True, cat))
        out.append((sympy.latex(sympy.expand(expr + 1)), False, "wrong_constant"))
        out.append((sympy.latex(sympy.expand(2 * expr)), False, "wrong_coefficient"))
    else:
        alt = sympy.latex(sympy.nsimplify(expr))
        if alt.replace(" ", "") != gold.replace(" ", ""):
            out.append((alt, True, "symbolic_rewrite"))
        sq = re.search(r"\\sqrt\{?(\d+)\}?", gold)
        if sq:
            n = int(sq.group(1))
            out.append((gold.replace(sq.group(0), f"\\sqrt{{{n + 1}}}", 1), False, "wrong_radicand"))
        if "\\pi" in gold:
            out.append((gold.replace("{\\pi}", "{1}").replace("\\pi", "").strip() or "1", False, "pi_dropped"))
        out.append((sympy.latex(expr + 1), False, "wrong_number"))
    out.append((sympy.latex(-expr), False, "sign_flip"))
    return out


def _split_top(s: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def structured_rewrites(gold: str, rng: random.Random) -> list[tuple[str, bool, str]] | None:
    g = gold.strip()
    out: list[tuple[str, bool, str]] = []
    plain = g.replace("\\left", "").replace("\\right", "")
    if plain.startswith("\\begin{pmatrix}"):
        body = plain[len("\\begin{pmatrix}") : -len("\\end{pmatrix}")]
        rows = [[c.strip() for c in r.split("&")] for r in body.split("\\\\")]
        frac_rows = [[re.sub(r"^(-?)(\d+)/(\d+)$", r"\1\\frac{\2}{\3}", c) for c in r] for r in rows]
        out.append(("\\begin{bmatrix}" + "\\\\".join("&".join(r) for r in rows) + "\\end{bmatrix}", True,
                    "matrix_reformatted"))
        if frac_rows != rows:
            out.append(("\\begin{pmatrix}" + " \\\\ ".join(" & ".join(r) for r in frac_rows) + "\\end{pmatrix}",
                        True, "matrix_reformatted"))
        bad = [r[:] for r in rows]
        bad[-1][-1] = bad[-1][-1][1:] if bad[-1][-1].startswith("-") else "-" + bad[-1][-1]
        out.append(("\\begin{pmatrix}" + " \\\\ ".join(" & ".join(r) for r in bad) + "\\end{pmatrix}", False,
                    "matrix_sign_flip"))
        if len(rows) > 1 and rows[0] != rows[1]:
            sw = [rows[1], rows[0]] + rows[2:]
            out.append(("\\begin{pmatrix}" + " \\\\ ".join(" & ".join(r) for r in sw) + "\\end{pmatrix}", False,
                        "swapped_entries"))
        return out
    if "\\cup" in plain:
        parts = [p.strip() for p in plain.split("\\cup")]
        out.append((" \\cup ".join(reversed(parts)), True, "reordered_union"))
        first = parts[0]
        flipped = first[:-1] + ("]" if first.endswith(")") else ")")
        if "\\infty" not in _split_top(first[1:-1])[-1]:
            out.append((" \\cup ".join([flipped] + parts[1:]), False, "wrong_bracket"))
        out.append((parts[0], False, "union_part_missing"))
        return out
    m = re.fullmatch(r"(x\s*\\in\s*)?([(\[])(.*)([)\]])", plain)
    if m and "," in m.group(3):
        items = _split_top(m.group(3))
        opening, closing = m.group(2), m.group(4)
        if len(items) >= 2:
            out.append((opening + ", ".join(items) + closing, True, "spacing"))
            out.append(("\\left" + opening + " " + " , ".join(items) + " \\right" + closing, True, "spacing"))
            if items[0] != items[1]:
                out.append((opening + ", ".join([items[1], items[0]] + items[2:]) + closing, False,
                            "swapped_tuple_entries"))
            flipped = [items[0][1:] if items[0].startswith("-") else "-" + items[0]] + items[1:]
            out.append((opening + ", ".join(flipped) + closing, False, "sign_flip"))
            if len(items) == 2 and (opening != "(" or closing != ")" or "\\infty" in plain):
                lo, hi = items
                other = {"(": "[", "[": "("}[opening] if "\\infty" not in lo else opening
                other_close = {")": "]", "]": ")"}[closing] if "\\infty" not in hi else closing
                if (other, other_close) != (opening, closing):
                    out.append((other + f"{lo}, {hi}" + other_close, False, "wrong_bracket"))
                ops = {"(": "<", "[": "\\le"}
                cops = {")": "<", "]": "\\le"}
                if "\\infty" in lo:
                    out.append((f"x {cops[closing]} {hi}", True, "interval_as_inequality"))
                elif "\\infty" in hi:
                    relation = ">" if opening == "(" else "\\ge"
                    out.append((f"x {relation} {lo}", True, "interval_as_inequality"))
                else:
                    out.append((f"{lo} {ops[opening]} x {cops[closing]} {hi}", True, "interval_as_inequality"))
        return out
    if g.startswith("\\text{("):
        letter = g[7]
        out += [(letter, True, "choice_letter"), (f"({letter})", True, "choice_letter"),
                (f"\\textbf{{({letter})}}", True, "choice_letter")]
        other = "ABCDE"[("ABCDE".index(letter) + 1) % 5]
        out += [(other, False, "wrong_choice"), (f"\\text{{({other})}}", False, "wrong_choice")]
        return out
    m = re.fullmatch(r"\\text\{([A-Za-z]+)\}", g)
    if m:
        word = m.group(1)
        out += [(word, True, "text_answer"), (f"\\text{{{word.lower()}}}", True, "text_answer"),
                (f"\\textbf{{{word}}}", True, "text_answer")]
        wrong = {"Evelyn": "Navin", "Navin": "Evelyn", "east": "west", "ellipse": "parabola", "even": "odd"}
        out.append((f"\\text{{{wrong.get(word, word + 's')}}}", False, "wrong_text"))
        return out
    if re.fullmatch(r"\d{1,3}(,(\\!)?\s?\d{3})+", g):
        n = int(re.sub(r"\D", "", g))
        return [(str(n), True, "thousands_separator"), (f"{n:,}".replace(",", "{,}"), True, "thousands_separator"),
                (str(n + 100), False, "wrong_number"), (f"{n // 1000}, {n % 1000}", False, "list_vs_number")]
    if "\\pm" in g or re.fullmatch(r"[^()\[\]]*,[^()\[\]]*", g.replace("\\{", "").replace("\\}", "")):
        if re.fullmatch(r"\d{1,3}(,\\!\s?\d{3})+|\\\$\d{1,3}(,\\!\d{3})+", g):
            return None
        inner = g.replace("\\{", "").replace("\\}", "")
        items = []
        for item in _split_top(inner):
            if "\\pm" in item:
                a, b = item.split("\\pm")
                items += [f"{a.strip()}+{b.strip()}" if a.strip() else b.strip(),
                          f"{a.strip()}-{b.strip()}" if a.strip() else "-" + b.strip()]
            else:
                items.append(item)
        out.append((", ".join(reversed(items)), True, "reordered_set"))
        out.append(("\\{" + ", ".join(items) + "\\}", True, "set_braces"))
        out.append((", ".join(items[:-1]), False, "set_element_missing"))
        if "\\pm" in g:
            out.append((items[0], False, "pm_single_root"))
        else:
            out.append((", ".join(items[:-1] + [items[-1] + "+1"]), False, "wrong_number"))
        return out
    m = re.fullmatch(r"(\d+)_\{?(\d+)\}?", g)
    if m:
        digits, base = m.groups()
        out += [(f"{digits}_{{{base}}}", True, "base_subscript"), (digits, True, "base_subscript"),
                (f"{int(digits) + 1}_{{{base}}}", False, "wrong_number")]
        return out
    m = re.fullmatch(r"([a-z])\s*=\s*(.+)", g)
    if m:
        var, rhs = m.groups()
        out += [(rhs, True, "assignment_stripped"), (f"{var}={rhs.replace(' ', '')}", True, "spacing")]
        return out + [(f"{var} = {x}", eq, cat) for x, eq, cat in symbolic_rewrites(rhs, rng) if not eq][:2]
    if "=" in g:
        lhs, rhs = g.split("=")
        out += [(f"{rhs.strip()} = {lhs.strip()}", True, "equation_sides_swapped"),
                (f"-\\left({lhs.strip()}\\right) = 0" if rhs.strip() == "0" else f"{lhs} = {rhs} + 0", True,
                 "equation_scaled"),
                (f"2\\left({lhs.strip()}\\right) = 2\\left({rhs.strip()}\\right)", True, "equation_scaled")]
        out.append((g.replace("+ 4", "- 4"), False, "sign_flip"))
        return out
    return None


def generate() -> list[dict]:
    if not MATH500.exists():
        sys.exit(f"MATH500 not found at {MATH500}")
    rng = random.Random(20240601)
    rows = [json.loads(line) for line in MATH500.read_text().splitlines() if line.strip()]
    pairs: list[dict] = []
    seen: set[tuple[str, str]] = set()

    def add(gold: str, cand: str, eq: bool, cat: str, source: str) -> None:
        if (gold, cand) in seen or gold.strip() == cand.strip():
            return
        seen.add((gold, cand))
        pairs.append({"gold": gold, "candidate": cand, "equivalent": eq, "category": cat, "source": source})

    for row in rows:
        gold, uid = row["answer"], row["unique_id"]
        if any(p["gold"] == gold for p in pairs):
            continue
        structured = structured_rewrites(gold, rng)
        if structured is not None:
            candidates = structured
        else:
            q = _plain_fraction(gold)
            if q is not None:
                candidates = number_rewrites(gold, q, rng)
            else:
                candidates = symbolic_rewrites(gold, rng)
        rng.shuffle(candidates)
        n_eq = n_neq = 0
        for cand, eq, cat in candidates:
            if (eq and n_eq >= 2) or (not eq and n_neq >= 2):
                continue
            check = _numeric_equal(gold, cand)
            if check is not None and check != eq:
                print(f"dropped (label {eq}, numeric {check}): {gold!r} vs {cand!r}", file=sys.stderr)
                continue
            add(gold, cand, eq, cat, uid)
            n_eq += eq
            n_neq += not eq
    for gold, cand, eq, url in PUBLIC_CASES:
        add(gold, cand, eq, "public_issue", url)
    return pairs


def main() -> None:
    pairs = generate()
    with OUT.open("w") as fh:
        for pair in pairs:
            fh.write(json.dumps(pair, ensure_ascii=False) + "\n")
    n_eq = sum(p["equivalent"] for p in pairs)
    print(f"wrote {len(pairs)} pairs ({n_eq} equivalent, {len(pairs) - n_eq} non-equivalent) to {OUT}")


if __name__ == "__main__":
    main()
