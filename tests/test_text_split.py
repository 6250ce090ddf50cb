"""The long-text splitter: a table of texts and the pieces they must give, and its invariants."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from text_split import rules_for, spaced, split_text

TABLE = [
    # (name, text, max_chars, expected pieces)
    (
        "abbreviations are not sentence ends",
        "Mr. Smith met Dr. Jones in the U.S. capital, e.g. at noon. They talked.",
        60,
        ["Mr. Smith met Dr. Jones in the U.S. capital, e.g. at noon.", "They talked."],
    ),
    (
        "decimals and thousands stay whole",
        "Pi is about 3.14159 and the price was $3,000.50 in total. That is all.",
        60,
        ["Pi is about 3.14159 and the price was $3,000.50 in total.", "That is all."],
    ),
    (
        "a quote ends with its closing mark",
        'He said "Stop! Now." Then he left. “Why?” she asked.',
        24,
        ['He said "Stop! Now."', "Then he left.", "“Why?” she asked."],
    ),
    (
        "times and versions",
        "We met at 10 a.m. and left at 10:30. Version 2.0 shipped.",
        40,
        ["We met at 10 a.m. and left at 10:30.", "Version 2.0 shipped."],
    ),
    (
        "sentences are packed up to the budget",
        "One. Two. Three. Four. Five.",
        11,
        ["One. Two.", "Three.", "Four. Five."],
    ),
    (
        "Chinese without spaces: sentence marks",
        "东京是日本的首都。它很大！你去过吗？是的。",
        10,
        ["东京是日本的首都。", "它很大！你去过吗？", "是的。"],
    ),
    (
        "Chinese: a long sentence is cut at its clause marks",
        "今天天气很好，我们去公园散步，然后吃午饭。",
        8,
        ["今天天气很好，", "我们去公园散步，", "然后吃午饭。"],
    ),
    (
        "Japanese",
        "これはペンです。あれは何ですか？わかりません、本当に。",
        12,
        ["これはペンです。", "あれは何ですか？", "わかりません、本当に。"],
    ),
    (
        "a long sentence is cut at clauses before spaces",
        "When the rain stopped, the children ran outside; the dog followed them: it was a fine day.",
        40,
        [
            "When the rain stopped,",
            "the children ran outside;",
            "the dog followed them:",
            "it was a fine day.",
        ],
    ),
    (
        "a dash set off by spaces is a clause end, a hyphen is not",
        "A well-known fact — and a surprising one — is here.",
        30,
        ["A well-known fact —", "and a surprising one —", "is here."],
    ),
    (
        "a run without punctuation is cut at spaces",
        "alpha beta gamma delta epsilon zeta eta theta",
        17,
        ["alpha beta gamma", "delta epsilon", "zeta eta theta"],
    ),
    (
        "a run without spaces is cut hard",
        "abcdefghijklmnopqrstuvwxyz",
        10,
        ["abcdefghij", "klmnopqrst", "uvwxyz"],
    ),
    (
        "Chinese without any punctuation is cut hard",
        "我们明天一起去看电影吧好吗",
        5,
        ["我们明天一", "起去看电影", "吧好吗"],
    ),
    (
        "paragraphs",
        "First paragraph.\n\nSecond one\nwith a line break.",
        100,
        ["First paragraph.\n\nSecond one\nwith a line break."],
    ),
    (
        "Chinese: an ellipsis and a doubled dash end clauses (a trial: cut mid-word at the length)",
        "他说……我不知道该怎么办……他又说——算了吧——走吧。",
        14,
        ["他说……我不知道该怎么办……", "他又说——算了吧——走吧。"],
    ),
    (
        "an ellipsis followed by a space ends a clause; one of several marks does not part them",
        "Well… I thought about it... and then, honestly, I left.",
        30,
        ["Well… I thought about it...", "and then, honestly, I left."],
    ),
    (
        "Japanese: a quotation's words after it stay in its sentence (a trial: cut at '？」')",
        "はい。「本当ですか？」と彼は聞いた。",
        16,
        ["はい。", "「本当ですか？」と彼は聞いた。"],
    ),
    (
        "Russian: Russian abbreviations (a trial: English's ended a sentence at 'г.')",
        "Обычно тут. Он родился в 1990 г. в Москве. Потом он уехал.",
        32,
        ["Обычно тут.", "Он родился в 1990 г. в Москве.", "Потом он уехал."],
    ),
    (
        "Ukrainian: Ukrainian abbreviations",
        "Так. Він народився в 1990 р. у Києві. Добре.",
        34,
        ["Так.", "Він народився в 1990 р. у Києві.", "Добре."],
    ),
    ("blank text", "  \n ", 10, []),
]


@pytest.mark.parametrize(("name", "text", "max_chars", "expected"), TABLE, ids=[row[0] for row in TABLE])
def test_table(name, text, max_chars, expected):
    assert split_text(text, max_chars) == expected


def _squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize(("name", "text", "max_chars", "expected"), TABLE, ids=[row[0] for row in TABLE])
def test_pieces_fit_and_lose_nothing(name, text, max_chars, expected):
    pieces = split_text(text, max_chars)
    assert all(0 < len(p) <= max_chars for p in pieces)
    assert _squeeze("".join(pieces)) == _squeeze(text)
    # With the whitespace they were cut at (a long answer's transcript, piece by piece), they are the text.
    parts = spaced(" " + text + "\n", pieces)
    assert [p.strip() for p in parts] == pieces
    assert "".join(parts) == (" " + text + "\n" if pieces else "")


def test_3000_characters_without_punctuation_split_at_spaces():
    rng = random.Random(3)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 11)))
        for _ in range(600)
    ]
    text = " ".join(words)[:3000].rstrip()
    assert len(text) >= 2990 and not re.search(r"[.,;:!?]", text)
    pieces = split_text(text, 250)
    assert len(pieces) >= 12
    assert all(len(p) <= 250 for p in pieces)
    assert " ".join(pieces) == text  # every cut is at a space: no word is broken
    # Greedy: each piece is as full as the next word allows.
    for piece, following in zip(pieces, pieces[1:], strict=False):
        assert len(piece) + 1 + len(following.split(" ")[0]) > 250


def test_3000_characters_of_sentences_end_every_piece_at_a_sentence():
    sentence = "The quick brown fox, who was not slow, jumped over 3.5 lazy dogs."
    text = " ".join([sentence] * 46)
    assert len(text) > 3000
    pieces = split_text(text, 300)
    assert all(p.endswith("dogs.") and len(p) <= 300 for p in pieces)
    assert " ".join(pieces) == text


def test_a_piece_not_found_in_the_text_is_joined_with_a_space():
    assert spaced("One. Two.", ["One.", "Three."]) == ["One.", " Three."]


def test_the_rules_are_those_of_the_texts_script():
    assert rules_for("Он родился в Москве. Hello.") == "ru"
    assert rules_for("Він народився в Києві.") == "uk"
    assert rules_for("Πού είσαι;") == "el"
    assert rules_for("Wir treffen uns z. B. am Montag, Д.") == "en"  # (most letters Latin)
    assert rules_for("他说……") == rules_for("") == "en"
    # Given, a language is taken as it is.
    assert split_text("Обычно тут. Он родился в 1990 г. в Москве.", 32, "en")[0].endswith("г.")


def test_budget_must_be_positive():
    with pytest.raises(ValueError):
        split_text("Hello.", 0)


@pytest.mark.parametrize(
    ("text", "first_ends"),
    [
        (
            "a" + "\N{THUMBS UP SIGN}\N{EMOJI MODIFIER FITZPATRICK TYPE-4}" * 200,
            "\N{EMOJI MODIFIER FITZPATRICK TYPE-4}",
        ),
        ("x" * 299 + "e\N{COMBINING ACUTE ACCENT}" + "y" * 10, "x"),  # the accent stays on its e
        (
            "z" + "\N{REGIONAL INDICATOR SYMBOL LETTER U}\N{REGIONAL INDICATOR SYMBOL LETTER S}" * 150,
            "\N{REGIONAL INDICATOR SYMBOL LETTER S}",
        ),
        ("w" * 298 + "\N{WOMAN}\N{ZERO WIDTH JOINER}\N{PERSONAL COMPUTER}" + "v", "w"),
    ],
    ids=["skin tone", "combining accent", "flags", "joined emoji"],
)
def test_a_run_without_spaces_is_cut_between_graphemes(text, first_ends):
    """A cut every 300 characters moves back to a boundary between what a reader sees as characters: no
    piece starts with a mark that belongs to the one before (it would be spoken as something else)."""
    import regex

    pieces = split_text(text, 300)
    assert "".join(pieces) == text and all(len(p) <= 300 for p in pieces) and len(pieces) > 1
    assert pieces[0].endswith(first_ends)
    graphemes = regex.findall(r"\X", text)
    ends = set(np.cumsum([len(g) for g in graphemes]).tolist())
    assert all(end in ends for end in np.cumsum([len(p) for p in pieces]).tolist())


def test_a_grapheme_longer_than_a_piece_is_cut_at_the_limit():
    text = "e" + "\N{COMBINING ACUTE ACCENT}" * 400
    assert [len(p) for p in split_text(text, 300)] == [300, 101]
