"""A text answer's tokens into streamed text, at a cost per token that does not grow with the answer.

Decoding every token again at every step (``tokenizer.decode(all_ids)``) costs time in proportion to the
answer so far, and the batched engine does it for every text row at every step: with transformers' Python
wrapper, which converts the ids one by one, 3.6 ms for 1,000 tokens on this project's CPU, so 16 rows of
long answers would spend tens of milliseconds of host time per step. Here each new token decodes a window
of a few tokens with the tokenizer's own (Rust) decoder: the tokens since the last text that was whole, and
the ones just before them for context (a SentencePiece-style decoder drops a leading space at the start of
what it decodes; the context token takes that). A token that ends in the middle of a character (byte-level
BPE splits UTF-8) waits for the token that completes it. The text so far is the concatenation of the
windows' new parts: the whole answer decoded at once, and what the stream sent is exactly what the final
text holds. Stop strings are looked for in the text that is new since the last look (and the few
characters before it that a stop string may begin in), so they cost nothing per token either.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"  # what a decoder gives for a character whose bytes have not all come yet


def ids_decoder(tokenizer) -> Callable[[list[int]], str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)`` for one thread's use alone, without the
    tokenizer's clean-up of spaces before punctuation.

    A fast tokenizer's Rust tokenizer is copied: the copy is the caller's alone, so decoding never waits
    for (or trips over) another thread encoding a prompt with the original. The clean-up (on in Llama 3's
    tokenizer configuration, so Higgs Audio's) is left out: it rewrites what the model wrote ("Bonjour !"
    becomes "Bonjour!", "x ' y" becomes "x'y"), and it is not a function of the tokens one at a time, so a
    stream cleaned as it goes could send text that the whole answer cleaned at once does not have.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    from tokenizers import Tokenizer

    own = Tokenizer.from_str(backend.to_str())
    return lambda ids: own.decode(ids, skip_special_tokens=True)


def first_stop(text: str, stops: list[str], start: int = 0) -> int:
    """Where the first of ``stops`` found in ``text`` (from ``start`` on) begins; -1 when none is."""
    return min((i for i in (text.find(s, start) for s in stops if s) if i >= 0), default=-1)


class Detokenizer:
    """One generation's text, token by token: the text to send now, and whether a stop string ended it.

    ``decode`` comes from ``ids_decoder``. ``add`` takes each token and returns the text that can go out
    (held back: an end of the text that a stop string begins with); ``finish`` returns the rest when the
    generation ends. ``text`` is the answer (cut before the stop string that ended it, if one did).
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]):
        self._decode = decode
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) - 1 for s in self.stops), default=0)
        self.ids: list[int] = []
        self._context = 0  # the window starts here: the tokens of the last new part, for context
        self._whole = 0  # the tokens before this made whole text
        self._decoded = ""  # the text of ids[:_whole]
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._looked = 0  # stop strings were looked for in text[:_looked]

    def add(self, token: int) -> str:
        """Take the next token; the text that can be sent now ('' when none). After a stop string the
        answer is over: ``stopped`` is set and later tokens are ignored."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self._take(final=False)
        return self._ready(final=False)

    def finish(self) -> str:
        """The generation ended: the text not sent yet (a character left incomplete comes out as U+FFFD,
        as the whole answer decoded at once would have it)."""
        if not self.stopped:
            self._take(final=True)
        return self._ready(final=True)

    def _take(self, final: bool) -> None:
        if len(self.ids) == self._whole:
            return
        before = self._decode(self.ids[self._context : self._whole])
        after = self._decode(self.ids[self._context :])
        if len(after) > len(before) and (final or not after.endswith(REPLACEMENT)):
            self._decoded += after[len(before) :]
            self._context, self._whole = self._whole, len(self.ids)

    def _ready(self, final: bool) -> str:
        text = self._decoded
        if not self.stopped:
            start = max(0, self._looked - self._hold)
            cut = first_stop(text, self.stops, start)
            self._looked = len(text)
            if cut >= 0:
                text = text[:cut]
                self.stopped = final = True
            self.text = text
        ready = len(self.text) if final else len(self.text) - self._could_stop(self.text)
        if ready <= self.sent:
            return ""
        piece = self.text[self.sent : ready]
        self.sent = ready
        return piece

    def _could_stop(self, text: str) -> int:
        """How many characters at the end of ``text`` could begin a stop string (held back until the next
        tokens tell): the longest end of the text that a stop string starts with."""
        if not text:
            return 0
        last, best = text[-1], 0
        for stop in self.stops:
            k = min(len(stop) - 1, len(text))
            while k > best:
                k = stop.rfind(last, 0, k) + 1  # the longest start of ``stop`` ending as the text does
                if k > best and text.endswith(stop[:k]):
                    best = k
                    break
                k -= 1
        return best
