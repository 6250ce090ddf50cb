"""Split a long text into pieces that a speech model speaks one at a time.

Sentences come from ``sentencex`` (Wikimedia's rule-based segmenter: abbreviations such as "Mr." or "e.g.",
decimals, quotes, ellipses, and the full stops of Chinese and Japanese); consecutive sentences are packed into
pieces of at most ``max_chars`` characters, so a piece ends at a sentence end whenever one fits. A sentence
longer than that is cut at its clauses (``, ; :`` and dashes followed by a space, ``，、；：``, an ellipsis
``…`` and a doubled dash ``——`` with or without one), a clause still too long at spaces, and a run without
spaces (a long word, or Chinese without punctuation) at ``max_chars``, moved back to the last boundary
between graphemes (what a reader sees as one character: a letter with its accents, an emoji with its skin
tone or its joined parts, a flag). No character is dropped: the pieces, joined with the whitespace they were
split at, are the text. The abbreviations known are those of the text's script's language (Russian's for
Cyrillic, Greek's for Greek), else English's.
"""

from __future__ import annotations

import re

import regex
from sentencex import segment

# A clause ends after a Latin mark followed by whitespace (so "3,000" and "10:30" stay whole), after a dash
# set off by spaces, after a CJK mark, which needs no space, and after an ellipsis or a doubled dash, with or
# without a space (Chinese writes "……" and "——" between clauses; a trial's long Chinese sentence of them
# was cut mid-word at the piece's length).
_CLAUSE_END = re.compile(
    r"(?<=[,;:])\s+|(?<=\s[\u2013\u2014-])\s+|(?<=[\uff0c\u3001\uff1b\uff1a])"
    r"|(?<=\u2026)(?!\u2026)\s*|(?<=\u2014\u2014)(?!\u2014)\s*"
)
_SPACE = re.compile(r"\s+")
_GRAPHEME = regex.compile(r"\X")  # an extended grapheme cluster (Unicode's UAX #29)
_SPEAKABLE = regex.compile(r"[\p{L}\p{N}\p{P}\p{S}]")


def speakable(text: str) -> bool:
    """Whether ``text`` holds anything to speak: a letter, digit, punctuation mark or symbol (an emoji is
    one). A text of spaces, zero-width or byte-order marks, control characters or lone accents holds
    nothing, and was spoken as seconds of sound."""
    return _SPEAKABLE.search(text) is not None


def split_text(text: str, max_chars: int, language: str | None = None) -> list[str]:
    """``text`` as pieces of 1 to ``max_chars`` characters, stripped, in order; ``[]`` for a blank text.

    ``language`` picks sentencex's abbreviation rules (the sentence marks of every script apply whatever
    it is); by default those of the text's script (``rules_for``).
    """
    if max_chars < 1:
        raise ValueError("max_chars must be at least 1")
    units: list[str] = []
    for sentence in _sentences(text, language or rules_for(text)):
        units.extend(_units(sentence, max_chars))
    return _pack(units, max_chars)


# A quotation's closing bracket, and a word of kana after it that carries its sentence on (「本当ですか？」と
# 彼は聞いた。: "…", he asked.).
_QUOTE_CLOSED = re.compile(r"[\u300d\u300f\uff09]\s*$")
_GOES_ON = re.compile(r"^[\u3041-\u309f]")


def _sentences(text: str, language: str) -> list[str]:
    """sentencex's sentences of ``text``, but a Japanese quotation that ends with its own mark stays with
    the words after it that carry its sentence on (sentencex ended the sentence at "？」", and a piece began
    with "と彼は聞いた。")."""
    sentences: list[str] = []
    for sentence in segment(language, text):
        if sentences and _QUOTE_CLOSED.search(sentences[-1]) and _GOES_ON.match(sentence):
            sentences[-1] += sentence
        else:
            sentences.append(sentence)
    return sentences


# Scripts whose abbreviations sentencex knows in a language of their own, and the language whose rules are
# taken for them; any other text (Latin, or a script whose sentences end with marks of its own) takes
# English's. Cyrillic with a letter only Ukrainian writes is Ukrainian.
_SCRIPT_RULES = {"Cyrillic": "ru", "Greek": "el"}
_UKRAINIAN = re.compile("[\u0404\u0406\u0407\u0490\u0454\u0456\u0457\u0491]")  # Є І Ї Ґ є і ї ґ
_LETTERS = {script: regex.compile(rf"\p{{{script}}}") for script in ("Latin", *_SCRIPT_RULES)}


def rules_for(text: str) -> str:
    """The language whose sentence rules fit ``text``: that of its script when most of its letters are
    Cyrillic or Greek, else English. With English's, "в 1990 г. в Москве" ended a sentence at "г." (a
    trial: a long Russian text was split into pieces there); no script tells German from English, so
    Latin text keeps English's rules."""
    sample = text[:2000]
    counts = {script: len(letters.findall(sample)) for script, letters in _LETTERS.items()}
    script = max(counts, key=counts.__getitem__)
    if script not in _SCRIPT_RULES or counts[script] == 0:
        return "en"
    if script == "Cyrillic" and _UKRAINIAN.search(sample):
        return "uk"
    return _SCRIPT_RULES[script]


# A character of these scripts is a syllable (a Chinese character, a kana, a Hangul block): about three
# letters' worth of speech. Mandarin is read at 4 to 5 characters a second, English at about 15 letters.
_SYLLABIC = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]")
SYLLABLE_WEIGHT = 3


def spoken_length(text: str) -> int:
    """``text``'s length in letters' worth of speech: its characters, a Chinese, Japanese or Korean one
    counted ``SYLLABLE_WEIGHT`` times. What a piece's size and a default audio cap are measured in: 300
    Chinese characters take about a minute to say, 300 English letters about 20 s."""
    return len(text) + (SYLLABLE_WEIGHT - 1) * len(_SYLLABIC.findall(text))


def piece_characters(text: str, spoken: int) -> int:
    """The characters a piece of ``text`` holds when each piece should take ``spoken`` letters' worth of
    speech (``spoken_length``): ``spoken`` for a text in letters, a third of it in Chinese characters, in
    between for a text of both."""
    return max(1, round(spoken * len(text) / max(1, spoken_length(text))))


def spaced(text: str, pieces: list[str]) -> list[str]:
    """``split_text``'s pieces of ``text`` with the whitespace around them, so that they concatenate to
    ``text``: each piece takes the whitespace before it (the first also the text's leading, the last also
    its trailing whitespace). A piece not found where it should be is taken with one space before it."""
    parts: list[str] = []
    start = 0
    for piece in pieces:
        at = text.find(piece, start)
        if at < 0:
            return [piece if i == 0 else " " + piece for i, piece in enumerate(pieces)]
        parts.append(text[start : at + len(piece)])
        start = at + len(piece)
    if parts:
        parts[-1] += text[start:]
    return parts


def _units(sentence: str, max_chars: int) -> list[str]:
    """The sentence as one unit, or cut at clauses, spaces, and finally every ``max_chars`` characters.

    Each unit keeps the whitespace that followed it, so that concatenating the units gives the sentence back.
    """
    if len(sentence.strip()) <= max_chars:
        return [sentence]
    units: list[str] = []
    for clause in _cut_after(_CLAUSE_END, sentence):
        if len(clause.strip()) <= max_chars:
            units.append(clause)
            continue
        for word in _cut_after(_SPACE, clause):
            while len(word.strip()) > max_chars:
                cut = _grapheme_cut(word, max_chars)
                units.append(word[:cut])
                word = word[cut:]
            units.append(word)
    return units


def _grapheme_cut(text: str, limit: int) -> int:
    """The last boundary between graphemes of ``text`` within its first ``limit`` characters (``limit``
    itself when the first grapheme is longer)."""
    cut = 0
    for match in _GRAPHEME.finditer(text, 0, limit + 1):
        if match.end() > limit:
            break
        cut = match.end()
    return cut or limit


def _cut_after(pattern: re.Pattern[str], text: str) -> list[str]:
    """``text`` cut at the end of each match of ``pattern`` (the match stays with the left part)."""
    parts, start = [], 0
    for match in pattern.finditer(text):
        if match.end() > start:
            parts.append(text[start : match.end()])
            start = match.end()
    if start < len(text):
        parts.append(text[start:])
    return parts


def _pack(units: list[str], max_chars: int) -> list[str]:
    """Greedily join consecutive units while the stripped piece stays within ``max_chars``."""
    pieces: list[str] = []
    current = ""
    for unit in units:
        if not unit.strip():
            current += unit
            continue
        if current.strip() and len((current + unit).strip()) > max_chars:
            pieces.append(current.strip())
            current = ""
        current += unit
    if current.strip():
        pieces.append(current.strip())
    return pieces
