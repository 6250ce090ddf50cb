"""Prose for the long-text tests and benchmark: sentences with abbreviations, numbers and quotes, as a text
splitter meets them, repeated to any length."""

SENTENCES = [
    "Mr. Brown opened the old shop at 7.30 a.m. on a grey Monday in March.",
    "The bell above the door rang twice, as it always did, and the smell of paper filled the room.",
    "He counted 3,412 books on the shelves, e.g. atlases, diaries and a few rare maps of the U.S. coast.",
    '"Nobody reads maps any more," said his neighbour, leaning on the counter.',
    "Mr. Brown only smiled; he knew that somebody, somewhere, was looking for exactly this one.",
    "By noon the rain had stopped and the street was full of people with umbrellas they no longer needed.",
]


def sentences(count: int) -> str:
    """The first ``count`` sentences of the repeated text."""
    return " ".join(SENTENCES[i % len(SENTENCES)] for i in range(count))
