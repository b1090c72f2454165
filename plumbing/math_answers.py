"""MATH's answer normal form (Hendrycks et al. 2021): a reply's answer matches the reference's
when their normal forms are equal strings. data.extract_answer calls normalize_math; a reader
of the paper can skip this file.

The rules are those of the MATH release's `is_equiv` (its `_strip_string`), rewritten, with
three that the later Minerva-style scorers add: a whole number's trailing '.0' goes, as do
thousands commas and a bare '%', and \\text{...} keeps its content. It stays a comparison of
strings, as the original is: '2\\sqrt{3}' and '\\sqrt{12}' differ, so do '0.25' and '1/4'.
"""
from __future__ import annotations

import re

UNITS = re.compile(r"\\(?:text|mbox)\{ [^{}]*\}$")  # '5\text{ cm}': the release's units rule
# '5\text{cm}', '5 \mbox{m}': a unit word after a number
UNIT_WORD = re.compile(r"(\d)\s*\\(?:text|mbox|mathrm)\{[a-zA-Z ]+\}$")
TEXT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
WHOLE = re.compile(r"(-?\d+)\.0+")
THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
SLASH = re.compile(r"(-?\d+)/(\d+)")


def normalize_math(answer: str) -> str:
    """The normal form of a final answer (what \\boxed{...} holds): spacing, \\left/\\right,
    \\dfrac/\\tfrac, degrees, dollars, percent, units, \\text, fractions written without braces
    or as a/b, a leading 'x =' and a whole number's '.0' no longer tell two answers apart."""
    s = answer.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    s = UNITS.sub("", s.strip())
    s = UNIT_WORD.sub(r"\1", s.rstrip())
    s = TEXT.sub(r"\1", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    lhs, eq, rhs = s.partition("=")
    if eq and "=" not in rhs and len(lhs.strip()) <= 2:  # 'k = 5': the value, not the name
        s = rhs
    s = fix_fracs(fix_sqrt(s.replace(" ", "")))  # spaces first: '\\sqrt 3' is '\\sqrt{3}'
    if THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if WHOLE.fullmatch(s):
        s = WHOLE.fullmatch(s)[1]
    if s == "0.5":  # the release's one decimal written as the fraction its answers use
        return "\\frac{1}{2}"
    slash = SLASH.fullmatch(s)
    return f"\\frac{{{slash[1]}}}{{{slash[2]}}}" if slash else s


def fix_sqrt(s: str) -> str:
    """'\\sqrt3' -> '\\sqrt{3}': braces around a one-character radicand."""
    head, *rest = s.split("\\sqrt")
    return head + "".join("\\sqrt" + (r if r[:1] in ("{", "") else f"{{{r[0]}}}{r[1:]}")
                          for r in rest)


def fix_fracs(s: str) -> str:
    """'\\frac12' -> '\\frac{1}{2}', '\\frac1{72}' -> '\\frac{1}{72}', '\\frac{a}b' unchanged
    (as in the release): braces around one-character numerators and denominators."""
    head, *rest = s.split("\\frac")
    out = head
    for r in rest:
        if r.startswith("{"):
            out += "\\frac" + r
        elif len(r) < 2:  # '\frac1' at the end: no denominator, the text is left as it is
            return s
        elif r[1] == "{":
            out += f"\\frac{{{r[0]}}}{r[1:]}"
        else:
            out += f"\\frac{{{r[0]}}}{{{r[1]}}}{r[2:]}"
    return out
