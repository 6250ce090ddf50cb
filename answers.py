"""The audio answers a later chat request may name by id (OpenAI's multi-turn pattern: an assistant message
``{"audio": {"id": ...}}``): each answer's transcript and the audio codes of its last piece, kept until its
``expires_at``.

In memory by default. Where several processes serve one voice library (``cluster.py``'s replicas, behind a
proxy that sends a conversation's next turn to any of them), each answer is also written to a file in the
library's ``.answers`` folder (``HIGGS_SHARED_ANSWERS``), so that any of them finds it: a few KB a file,
written (on a thread of its own, off the event loop) before the answer's last bytes are sent, read (off
the event loop too) only for an id this process does not hold, and removed when it expires (by the process
that wrote it, or, for a process that has gone, by any other once the file is older than an answer's
lifetime).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time
import uuid
import zipfile
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from generation import AudioCodes

log = logging.getLogger(__name__)

# How long an audio answer stays usable by its id (OpenAI's ``expires_at``), and how many one process keeps
# at most (transcript and the codes of the last piece as int16: a few KB each, 2 bytes per codebook and
# frame).
AUDIO_LIFETIME_SECONDS = 3600
ANSWERS_KEPT = 4096
# How often a process sharing answers looks for files that no process will remove (their writer has gone).
SWEEP_SECONDS = 600.0
_ID = re.compile(r"audio_[0-9a-f]{32}")  # as routes/chat.py makes them: nothing else names a file


@dataclass(frozen=True)
class Answer:
    """An audio answer this server gave, as a later request may refer to it."""

    transcript: str
    codes: AudioCodes | None


def _answer(item: tuple[float, str, torch.Tensor | None] | None) -> Answer | None:
    if item is None:
        return None
    _, transcript, held = item
    return Answer(transcript, None if held is None else AudioCodes(held.to(dtype=torch.long)))


class Answers:
    """The audio answers later requests may name by id: each kept until its ``expires_at`` (``lifetime``
    seconds), at most ``capacity`` by this process (then the oldest goes first, logged: the server was
    asked to hold more answers an hour than it keeps). Codes are held as int16 (they are below 1,024).
    With a ``folder``, each answer is shared through a file there too (see the module)."""

    def __init__(
        self,
        capacity: int = ANSWERS_KEPT,
        lifetime: float = AUDIO_LIFETIME_SECONDS,
        folder: Path | None = None,
    ):
        self.capacity = capacity
        self.lifetime = lifetime
        self.folder = folder
        self.clock = time.time
        self._items: OrderedDict[str, tuple[float, str, torch.Tensor | None]] = OrderedDict()  # id -> item
        self._lock = threading.Lock()
        self._swept = 0.0
        self._files = ThreadPoolExecutor(1, thread_name_prefix="answers") if folder is not None else None

    def put(self, audio_id: str, transcript: str, codes: AudioCodes | None) -> Future[None] | None:
        """Keep an answer. Shared, its file is written on the answers' thread: the future returned ends
        when it is (None when answers are not shared)."""
        held = None if codes is None else codes.codes.to(dtype=torch.int16)
        now = self.clock()
        item = (now + self.lifetime, transcript, held)
        with self._lock:
            gone = self._drop_expired(now)
            self._items[audio_id] = item
            while len(self._items) > self.capacity:
                forgotten, _ = self._items.popitem(last=False)
                gone.append(forgotten)
                log.warning(
                    "forgot audio answer %s before its expiry: more than %d answers within %d s "
                    "(answers.ANSWERS_KEPT)",
                    forgotten,
                    self.capacity,
                    self.lifetime,
                )
        if self._files is None:
            return None
        return self._files.submit(self._share, audio_id, item, gone)

    async def find(self, audio_id: str) -> Answer | None:
        """``get``, off the event loop where it reads a file (shared answers, another process's): an
        answer this process holds is found where it is, with no thread in between."""
        if self.folder is None:
            return self.get(audio_id)
        now = self.clock()
        item = self._held(audio_id, now)
        if item is None:
            item = await asyncio.to_thread(self._read, audio_id, now)
        return _answer(item)

    def get(self, audio_id: str) -> Answer | None:
        now = self.clock()
        item = self._held(audio_id, now)
        if item is None and self.folder is not None:
            item = self._read(audio_id, now)
        return _answer(item)

    def _held(self, audio_id: str, now: float) -> tuple[float, str, torch.Tensor | None] | None:
        """The answer as this process holds it (None when it does not); the expired ones forgotten, and
        their shared files removed on the answers' thread."""
        with self._lock:
            gone = self._drop_expired(now)
            item = self._items.get(audio_id)
        if gone and self._files is not None:
            self._files.submit(self._remove, gone)
        return item

    def _drop_expired(self, now: float) -> list[str]:
        """Forget the expired answers (the oldest come first); their ids."""
        gone = []
        while self._items and next(iter(self._items.values()))[0] <= now:
            gone.append(self._items.popitem(last=False)[0])
        return gone

    # ---- the shared folder ----

    def _path(self, audio_id: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{audio_id}.npz"

    def _share(self, audio_id: str, item: tuple[float, str, torch.Tensor | None], gone: list[str]) -> None:
        self._write(audio_id, item)
        self._remove(gone)
        self._sweep_now_and_then()

    def _write(self, audio_id: str, item: tuple[float, str, torch.Tensor | None]) -> None:
        """The answer's file, written whole under a temporary name and renamed (a reader never sees half
        of one). A failure is logged: the answer is still held here."""
        expires, transcript, held = item
        assert self.folder is not None
        temporary = self.folder / f".tmp-{audio_id}-{uuid.uuid4().hex[:8]}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)  # (made again if it was removed)
            with open(temporary, "wb") as f:
                np.savez(
                    f,
                    expires=np.float64(expires),
                    transcript=np.str_(transcript),
                    codes=np.zeros((0, 0), np.int16) if held is None else held.numpy(),
                    has_codes=np.bool_(held is not None),
                )
            os.replace(temporary, self._path(audio_id))
        except OSError as exc:
            log.warning("audio answer %s is not shared with the other replicas: %s", audio_id, exc)
            with contextlib.suppress(OSError):
                temporary.unlink()

    def _read(self, audio_id: str, now: float) -> tuple[float, str, torch.Tensor | None] | None:
        """Another process's answer from its file; None when there is none, or it has expired (its file
        is then removed)."""
        if not _ID.fullmatch(audio_id):
            return None
        path = self._path(audio_id)
        try:
            with np.load(path, allow_pickle=False) as data:
                expires = float(data["expires"])
                transcript = str(data["transcript"])
                held = torch.from_numpy(data["codes"].copy()) if bool(data["has_codes"]) else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            log.warning("audio answer %s could not be read from %s: %s", audio_id, path, exc)
            return None
        if expires <= now:
            self._remove([audio_id])
            return None
        return expires, transcript, held

    def _remove(self, ids: list[str]) -> None:
        for audio_id in ids:
            with contextlib.suppress(OSError):
                self._path(audio_id).unlink()

    def _sweep_now_and_then(self) -> None:
        """Every ``SWEEP_SECONDS``, on a thread of its own (the folder may hold thousands of files, on a
        network filesystem): remove the files older than an answer's lifetime, which the process that
        wrote them did not remove (it stopped first)."""
        now = time.time()
        if now - self._swept < SWEEP_SECONDS:
            return
        self._swept = now
        threading.Thread(target=self._sweep, args=(now - self.lifetime,), daemon=True).start()

    def _sweep(self, before: float) -> None:
        assert self.folder is not None
        removed = 0
        for path in [*self.folder.glob("audio_*.npz"), *self.folder.glob(".tmp-audio_*")]:
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < before:
                    path.unlink()
                    removed += 1
        if removed:
            log.info("removed %d expired audio answers left in %s", removed, self.folder)
