"""A text answer's streamed text (``detokenize.py``): the whole answer decoded at once, token by token, at a
cost per token that does not grow with the answer; and through HTTP on the tiny engine."""

from __future__ import annotations

import json
import random

import pytest

from detokenize import Detokenizer, ids_decoder

TEXTS = ["Hello, world.", "naïve café", "日本語のテキスト", "emoji 🎉🎈 done", "don't , it 's .", "a ' b"]


@pytest.fixture(scope="module")
def tokenizer(tiny_settings):
    """The tiny model's text tokenizer: byte-level BPE without merges, so every byte of a multi-byte
    character is a token of its own (the hardest case for a decoder taking one token at a time)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_settings["HIGGS_MODEL"])


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A SentencePiece-style tokenizer (a space is "▁" on the token after it; decoding drops the space at
    the start of what it decodes), trained here on a few sentences."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    core = SentencePieceBPETokenizer()
    core.train_from_iterator([t * 20 for t in TEXTS] + ["the cat sat on the mat"] * 50, vocab_size=120)
    return PreTrainedTokenizerFast(tokenizer_object=core._tokenizer, clean_up_tokenization_spaces=False)


def sequences(tokenizer, rng: random.Random, n: int) -> list[list[int]]:
    """Token ids of mixed texts, with special tokens and stray bytes (broken characters) sprinkled in."""
    specials = tokenizer.all_special_ids
    out = []
    for _ in range(n):
        text = "".join(rng.choice([*TEXTS, " ", " .", " n't", " '", "?"]) for _ in range(rng.randrange(0, 6)))
        ids = tokenizer.encode(text, add_special_tokens=False)
        for _ in range(rng.randrange(0, 3)):
            ids.insert(rng.randrange(len(ids) + 1), rng.choice([*specials, rng.randrange(len(tokenizer))]))
        out.append(ids)
    return out


def streamed(detokenizer: Detokenizer, ids: list[int]) -> str:
    pieces = [detokenizer.add(token) for token in ids if not detokenizer.stopped]
    return "".join(pieces) + detokenizer.finish()


def test_the_streamed_text_is_the_whole_answer_decoded_at_once(tokenizer):
    """Mixed scripts, emoji, special tokens and stray bytes: the pieces sent concatenate to
    ``tokenizer.decode`` of all the tokens."""
    decode = ids_decoder(tokenizer)
    for ids in sequences(tokenizer, random.Random(7), 400):
        detokenizer = Detokenizer(decode, [])
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        assert streamed(detokenizer, ids) == detokenizer.text == whole, ids


def test_the_text_is_what_the_model_wrote_even_where_the_tokenizer_cleans_up_spaces(tokenizer):
    """Llama 3's tokenizer configuration (so Higgs Audio's) asks ``decode`` to remove a space before
    punctuation; the answer keeps it ("Bonjour !" is French), and what was streamed stays the answer."""
    tokenizer.clean_up_tokenization_spaces = True
    try:
        decode = ids_decoder(tokenizer)
        ids = tokenizer.encode("Bonjour ! Ça va ? x ' y", add_special_tokens=False)
        assert tokenizer.decode(ids) == "Bonjour! Ça va? x'y"
        assert streamed(Detokenizer(decode, []), ids) == "Bonjour ! Ça va ? x ' y"
    finally:
        tokenizer.clean_up_tokenization_spaces = False


def test_a_sentencepiece_tokenizer_keeps_the_space_before_each_token(sentencepiece_tokenizer):
    """Each window starts with a token already decoded, so the space its decoder drops at the start is
    not one of the new text's."""
    tokenizer = sentencepiece_tokenizer
    decode = ids_decoder(tokenizer)
    for ids in sequences(tokenizer, random.Random(3), 200):
        detokenizer = Detokenizer(decode, [])
        assert streamed(detokenizer, ids) == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_each_token_decodes_a_few_tokens_whatever_the_length(tokenizer):
    """Two short windows per token, even 3,000 tokens in (decoding everything at each token would make a
    long answer's steps slower and slower)."""
    windows: list[int] = []
    decode = ids_decoder(tokenizer)

    def counted(ids: list[int]) -> str:
        windows.append(len(ids))
        return decode(ids)

    ids = tokenizer.encode("Ünïcödé and 🎉 emoji, " * 150, add_special_tokens=False)
    assert len(ids) > 3000
    detokenizer = Detokenizer(counted, [])
    assert streamed(detokenizer, ids) == tokenizer.decode(ids)
    assert len(windows) <= 2 * len(ids) + 2
    assert max(windows) <= 8  # an emoji's 4 bytes waiting for their last, after the 4 of the one before


def test_a_stop_string_ends_the_text_before_it_and_nothing_of_it_is_sent(tokenizer):
    decode = ids_decoder(tokenizer)
    ids = tokenizer.encode("one two nev STOP three", add_special_tokens=False)
    detokenizer = Detokenizer(decode, ["STOP", "", "never"])
    sent = []
    for token in ids:
        sent.append(detokenizer.add(token))
        if detokenizer.stopped:
            break
    # "nev" waited while it could still become "never", "S" while it could become "STOP".
    assert "".join(sent[: len("one two nev")]) == "one two "
    assert detokenizer.stopped and detokenizer.text == "one two nev "
    assert detokenizer.add(tokenizer.encode("x")[0]) == ""  # the answer is over
    assert "".join(sent) + detokenizer.finish() == "one two nev "


def test_text_goes_out_at_once_unless_its_end_could_begin_a_stop_string(tokenizer):
    """A stop string of a thousand characters holds back nothing of a text that does not end like its
    start (holding back its length less one would hold the whole answer)."""
    decode = ids_decoder(tokenizer)
    detokenizer = Detokenizer(decode, ["x" * 1000, "world!"])
    sent = [detokenizer.add(token) for token in tokenizer.encode("hello wox", add_special_tokens=False)]
    # "w" and "wo" could begin "world!"; then "wo" goes, and the "x" that could begin the thousand waits.
    assert sent == [*"hello ", "", "", "wo"]
    assert detokenizer.finish() == "x"


def test_with_stop_strings_the_stream_is_the_answer_cut_at_the_first(tokenizer):
    """Random texts and stop strings from a small alphabet (so that stops often begin, and often end, in
    the text): the pieces sent are the answer, which is the whole text up to where a stop string first
    completed."""
    rng = random.Random(11)
    decode = ids_decoder(tokenizer)
    for _ in range(500):
        text = "".join(rng.choice("ab é🎉") for _ in range(rng.randrange(0, 40)))
        stops = [
            "".join(rng.choice("ab é") for _ in range(rng.randrange(1, 5)))
            for _ in range(rng.randrange(1, 4))
        ]
        ids = tokenizer.encode(text, add_special_tokens=False)
        detokenizer = Detokenizer(decode, stops)
        sent = streamed(detokenizer, ids)
        assert sent == detokenizer.text, (text, stops)
        ends = [i + len(s) for s in stops for i in [text.find(s)] if i >= 0]
        if ends:  # cut before the stop that completed first
            first = min(ends)
            assert detokenizer.stopped
            assert detokenizer.text == min(
                (text[: text.find(s)] for s in stops if 0 <= text.find(s) and text.find(s) + len(s) == first),
                key=len,
            )
        else:
            assert not detokenizer.stopped and detokenizer.text == text


def test_a_character_split_across_tokens_is_sent_whole(tokenizer):
    decode = ids_decoder(tokenizer)
    ids = tokenizer.encode("é🎉", add_special_tokens=False)
    assert len(ids) == 6
    detokenizer = Detokenizer(decode, [])
    assert [detokenizer.add(token) for token in ids] == ["", "é", "", "", "", "🎉"]
    # An answer that ends in the middle of a character ends with U+FFFD, as decoding it at once gives.
    cut = Detokenizer(decode, [])
    assert streamed(cut, ids[:4]) == "é\ufffd" == tokenizer.decode(ids[:4])


def test_a_long_text_answer_streams_as_it_is_answered_whole(client, engine, monkeypatch):
    """Through HTTP on the tiny engine: a streamed text answer's deltas add up to the same request's
    non-streamed content, and the engine decoded no more than a few tokens at a time."""
    windows: list[int] = []
    decode = engine.higgs.decode_ids

    def counted(ids: list[int]) -> str:
        windows.append(len(ids))
        return decode(ids)

    monkeypatch.setattr(engine.higgs, "decode_ids", counted)
    body = {
        "model": "gpt-4o-audio-preview", "modalities": ["text"], "max_tokens": 300, "seed": 31,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
    }  # fmt: skip
    whole = client.post("/v1/chat/completions", json=body)
    assert whole.status_code == 200, whole.text
    content = whole.json()["choices"][0]["message"]["content"]
    deltas = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    deltas.append(choice["delta"].get("content") or "")
    assert whole.json()["usage"]["completion_tokens"] == 300 and len(content) > 200
    assert "".join(deltas).strip() == content
    # The tiny model writes random bytes: a run of broken characters waits (and widens the window) until
    # a token makes whole text again; nowhere near the answer's 300 tokens.
    assert len(windows) > 300 and max(windows) <= 20
