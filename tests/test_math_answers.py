"""MATH scoring: the answer in a reply's last \\boxed{...} (nested braces), compared with the
reference's after MATH's normalisation (plumbing/math_answers.py), strict by default as GSM8K's
'####' is; and the rows a MATH file gives, scored by train.score_answers as evaluation does.

Every pair below was checked by hand: each that matches is the same answer written two ways,
each that must not match is two different answers (or, where said, the same value that MATH's
string comparison does not see, as in the release's own scorer).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

import train  # noqa: E402
from data import (DataError, encode_example, extract_answer, last_boxed, load_rows,  # noqa: E402
                  read_jsonl)
from plumbing.math_answers import normalize_math  # noqa: E402
from plumbing.tokenizer import byte_tokenizer  # noqa: E402


def test_last_boxed_by_hand():
    assert last_boxed(r"so $\boxed{5}$.") == "5"
    assert last_boxed(r"$\boxed{\frac{1}{2}}$") == r"\frac{1}{2}"  # nested braces
    assert last_boxed(r"\boxed{1} then \boxed{\sqrt{x^{2}}}") == r"\sqrt{x^{2}}"  # the last one
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"The answer is $\boxed 3$.") == "3"  # the release's brace-less form
    assert last_boxed(r"\boxed{\frac{1}{2}") is None  # braces that never close
    assert last_boxed(r"\boxed{ }") is None
    assert last_boxed("The answer is 5.") is None
    assert last_boxed(r"\boxed") is None


# (reference's boxed answer, reply's boxed answer): the same answer
MATCH = [
    (r"\frac{1}{2}", r"\dfrac{1}{2}"),
    (r"\frac{1}{2}", r"\tfrac12"),
    (r"\frac{1}{2}", "1/2"),
    (r"\frac{1}{2}", "0.5"),
    (r"\frac{1}{2}", ".5"),
    (r"\frac34", r"\frac{3}{4}"),
    (r"\frac{1}{72}", r"\frac1{72}"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    ("10", "10.0"),
    ("10", "10.00"),
    ("-4", "-4.0"),
    ("1000", "1,000"),
    ("1000000", "1,000,000"),
    ("5", r"5\text{ cm}"),
    ("5", r"5 \text{cm}"),
    ("5", r"5\mbox{ inches}"),
    ("90", r"90^\circ"),
    ("90", r"90^{\circ}"),
    ("25", r"25\%"),
    ("25", "25%"),
    ("5", r"\$5"),
    ("5", "x = 5"),
    ("5", "k=5"),
    (r"\text{(A)}", "(A)"),
    (r"\sqrt{3}", r"\sqrt3"),
    (r"\sqrt{3}", r"\sqrt 3"),
    (r"2\sqrt{2}", r"2 \sqrt{2}"),
    ("0.25", " .25"),
    (r"x^2+2x+1", "x^2 + 2x + 1"),
    (r"-\frac{2}{3}", r"-\dfrac{2}{3}"),
    (r"\frac{\sqrt{3}}{2}", r"\dfrac{\sqrt{3}}{2}"),
    (r"[-2,5)", r"\left[-2,5\right)"),
    (r"10^\circ", r"10^{\circ}"),
]

# (reference, reply): different answers
NO_MATCH = [
    (r"\frac{1}{2}", r"\frac{2}{1}"),
    ("-3", "3"),
    ("(1,2)", "(2,1)"),
    ("5", "5.01"),
    ("12", "1,2"),  # a pair, not twelve: only 1,000-style groups are thousands
    ("10", "100"),
    (r"\sqrt{2}", "2"),
    ("x^2", "x^3"),
    (r"\frac{1}{3}", "0.33"),
    (r"\frac{1}{2}", "0.50"),  # the release turns only '0.5' itself into the fraction
    ("x + y = 5", "5"),  # an equation, kept whole: only a name of one or two letters goes
    (r"2\sqrt{3}", r"\sqrt{12}"),  # the same value; MATH compares strings, as the release does
    ("0.25", r"\frac{1}{4}"),  # the same value, not the same string
]


@pytest.mark.parametrize("ref, reply", MATCH)
def test_same_answer_written_two_ways_matches(ref, reply):
    reference = extract_answer(f"Solution ... $\\boxed{{{ref}}}$", boxed=True)
    assert reference is not None
    assert extract_answer(f"I think it is $\\boxed{{{reply}}}$.", boxed=True) == reference


@pytest.mark.parametrize("ref, reply", NO_MATCH)
def test_different_answers_do_not_match(ref, reply):
    assert normalize_math(ref) != normalize_math(reply)
    assert (extract_answer(f"\\boxed{{{reply}}}", boxed=True)
            != extract_answer(f"\\boxed{{{ref}}}", boxed=True))


def test_normal_forms_by_hand():
    assert normalize_math(r"\left( 3, \dfrac{\pi}{2} \right)") == r"(3,\frac{\pi}{2})"
    assert normalize_math(r"\frac12") == r"\frac{1}{2}"
    assert normalize_math("3/4") == r"\frac{3}{4}"
    assert normalize_math("1,234.0") == "1234"
    assert normalize_math(r"12\text{ apples}") == "12"
    assert normalize_math(r"\text{Tuesday}") == "Tuesday"
    assert normalize_math(r"\sqrt 3 + 1") == r"\sqrt{3}+1"


def test_strict_and_lenient():
    """Strict, as GSM8K's: no \\boxed{}, no answer. Lenient (reported apart): else the last
    number, in MATH's normal form. A '####' does not count for a MATH row."""
    assert extract_answer("The answer is 5.0.", boxed=True) is None
    assert extract_answer("The answer is 5.0", strict=False, boxed=True) == "5"
    assert extract_answer("#### 5", boxed=True) is None
    assert extract_answer(r"#### 5 but \boxed{6}", boxed=True) == "6"
    assert extract_answer(r"\boxed{6} #### 5") == "5"  # a GSM8K row reads '####', as before
    assert extract_answer(r"\boxed{}", strict=False, boxed=True) is None


MATH_ROWS = [  # the MATH release's shape, as scripts/prepare_data.py writes it for --task math
    {"question": "What is $1/2 + 1/4$?",
     "answer": r"We add: $\frac12+\frac14=\frac{3}{4}$. So $\boxed{\dfrac{3}{4}}$.",
     "level": "Level 1", "type": "Prealgebra"},
    {"question": "Solve $2x=10$.", "answer": r"$x=\boxed{5}$", "level": "Level 1",
     "type": "Algebra"},
    {"question": "How many degrees in a right angle?", "answer": r"It is $\boxed{90^\circ}$.",
     "level": "Level 1", "type": "Geometry"},
]


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_math_rows_read_and_encode(tmp_path):
    """A {question, answer} row whose answer has a \\boxed{} but no '####' is a MATH row: its
    answer is the boxed one, normalised, and the math task takes it (it refused it before)."""
    path = write(tmp_path / "math.jsonl", MATH_ROWS)
    examples = read_jsonl(path)
    assert [(e.answer, e.boxed) for e in examples] == [
        (r"\frac{3}{4}", True), ("5", True), ("90", True)]
    rows, task = load_rows(path, byte_tokenizer(), "auto", 4096, "fail", False)
    assert task == "math" and all(r.boxed for r in rows)
    gsm = read_jsonl(write(tmp_path / "gsm.jsonl", [{"question": "1+1?", "answer": "2\n#### 2"}]))
    assert (gsm[0].answer, gsm[0].boxed) == ("2", False)
    with pytest.raises(DataError, match=r"boxed"):  # neither '####' nor \boxed{}: refused
        encode_example(read_jsonl(write(tmp_path / "bad.jsonl", [
            {"question": "1+1?", "answer": "two"}]))[0], byte_tokenizer(), "math")


def test_evaluation_scores_math_rows(tmp_path):
    """train.score_answers (what train.evaluate, the study and the map report as accuracy) on a
    MATH file and hand-written replies: strict reads the last \\boxed{}, lenient the last number
    when there is none, averaged over the samples; a GSM8K row in the same file by its '####'."""
    path = write(tmp_path / "math.jsonl", MATH_ROWS + [
        {"question": "2+2?", "answer": "2+2=4\n#### 4"}])
    rows, task = load_rows(path, byte_tokenizer(), "auto", 4096, "fail", False)
    first = [r"So $\boxed{\frac34}$.",    # right: the same fraction
             r"\boxed{5.0}",              # right: trailing .0
             "The answer is 90.",         # no box: wrong strictly, right leniently
             "#### 4"]                    # the GSM8K row: right
    second = [r"\boxed{\frac{4}{3}}",     # wrong
              r"\boxed{x = 5}",           # right
              r"\boxed{90^{\circ}} \boxed{45}",  # the last box is wrong
              "#### 5"]                   # wrong
    res = train.score_answers([first, second], rows, task)
    assert res["accuracy"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert res["accuracy_lenient"] == pytest.approx((4 / 4 + 1 / 4) / 2)
    assert res["accuracy_sd"] == pytest.approx(2 ** 0.5 / 4)
