"""Audio answers named by id in a later turn (``answers.py``), shared by processes serving one voices folder
(``HIGGS_SHARED_ANSWERS``, as ``cluster.py``'s replicas do): a Ray trial's next turn reached the other
replica and got ``audio_not_found`` every time."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import torch
from fastapi.testclient import TestClient

from answers import AUDIO_LIFETIME_SECONDS, Answers
from app import create_app
from generation import AudioCodes

SPEAK = [{"role": "user", "content": "Hello there."}]
CHAT = {"model": "tts-1", "modalities": ["text", "audio"], "audio": {"voice": "default", "format": "wav"},
        "messages": SPEAK, "max_tokens": 8, "seed": 1}  # fmt: skip


def later_turn(audio_id: str) -> dict:
    return {**CHAT, "messages": [*SPEAK, {"role": "assistant", "audio": {"id": audio_id}}, SPEAK[0]]}


def test_an_answer_given_by_one_process_is_found_by_another_serving_the_same_folder(
    settings, engine, recognizer, tmp_path, monkeypatch
):
    files_on = set()  # the threads that wrote and read the answers' files: never the event loop's
    reads = []
    real_write, real_read = Answers._write, Answers._read

    def write(self, *args):
        files_on.add(threading.current_thread().name.split("_")[0])
        return real_write(self, *args)

    def read(self, *args):
        files_on.add(threading.current_thread().name.split("_")[0])
        reads.append(args[0])
        return real_read(self, *args)

    monkeypatch.setattr(Answers, "_write", write)
    monkeypatch.setattr(Answers, "_read", read)
    shared = settings.model_copy(update={"voices_dir": tmp_path / "voices", "shared_answers": True})
    alone = settings.model_copy(update={"voices_dir": tmp_path / "voices"})
    with (
        TestClient(create_app(shared, engine=engine, recognizer=recognizer)) as first,
        TestClient(create_app(shared, engine=engine, recognizer=recognizer)) as second,
        TestClient(create_app(alone, engine=engine, recognizer=recognizer)) as unshared,
    ):
        answered = first.post("/v1/chat/completions", json={**CHAT, "max_tokens": 30})
        answer = answered.json()["choices"][0]["message"]["audio"]
        kept = first.app.state.planner.answers.get(answer["id"])
        assert kept is not None and kept.codes.frames > 0
        assert (tmp_path / "voices" / ".answers" / f"{answer['id']}.npz").is_file()

        followed = second.post("/v1/chat/completions", json=later_turn(answer["id"]))
        assert followed.status_code == 200, followed.text
        assert followed.headers["x-voice"] == "native"  # the answer's audio carries the voice on
        assert files_on == {"answers", "asyncio"}, files_on  # the answers' thread; asyncio.to_thread's
        found = second.app.state.planner.answers.get(answer["id"])
        assert found.transcript == kept.transcript == answer["transcript"]
        assert torch.equal(found.codes.codes, kept.codes.codes)
        # The process that gave the answer finds it where it holds it: no file read, no thread hop.
        reads.clear()
        hops = []
        real_hop = asyncio.to_thread

        def hop(function, *args):
            hops.append(function.__name__)
            return real_hop(function, *args)

        monkeypatch.setattr(asyncio, "to_thread", hop)
        own = first.post("/v1/chat/completions", json=later_turn(answer["id"]))
        assert own.status_code == 200 and own.headers["x-voice"] == "native", own.text
        assert reads == [] and not {"get", "_read"} & set(hops), (reads, hops)
        monkeypatch.setattr(asyncio, "to_thread", real_hop)

        # An id that is not one of the server's never names a file: the same 400 as any unknown id.
        (tmp_path / "voices" / "elsewhere.npz").write_bytes(b"not an answer")
        for made_up in ("../elsewhere", "audio_../../elsewhere", "audio_" + "0" * 32):
            refused = second.post("/v1/chat/completions", json=later_turn(made_up))
            error = refused.json()["error"]
            assert refused.status_code == 400 and error["code"] == "audio_not_found", refused.text
            assert error["param"] == "messages[1].audio.id"

        # A process that does not share answers finds only its own, and says where they are kept.
        refused = unshared.post("/v1/chat/completions", json=later_turn(answer["id"]))
        error = refused.json()["error"]
        assert refused.status_code == 400 and error["code"] == "audio_not_found"
        assert "kept in memory" in error["message"]

        # Expired, the answer is gone for every process, and its file with it.
        answers = second.app.state.planner.answers
        answers.clock = lambda: time.time() + AUDIO_LIFETIME_SECONDS + 1
        refused = second.post("/v1/chat/completions", json=later_turn(answer["id"]))
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "audio_not_found"
        assert "in memory" not in refused.json()["error"]["message"]
        assert not (tmp_path / "voices" / ".answers" / f"{answer['id']}.npz").exists()


def test_shared_answers_are_forgotten_as_the_process_forgets_them_and_files_are_only_ids(tmp_path):
    folder = tmp_path / ".answers"
    codes = AudioCodes(torch.arange(16).view(8, 2))
    writer, reader = Answers(capacity=2, folder=folder), Answers(folder=folder)
    ids = [f"audio_{i:032x}" for i in range(3)]
    writer.put(ids[0], "kept as text only", None).result()  # (each file is written on the answers' thread)
    writer.put(ids[1], "one", codes).result()
    assert reader.get(ids[0]).codes is None and reader.get(ids[0]).transcript == "kept as text only"
    assert torch.equal(reader.get(ids[1]).codes.codes, codes.codes)
    writer.put(ids[2], "two", codes).result()  # over the capacity: the oldest goes, its file too
    assert reader.get(ids[0]) is None and not (folder / f"{ids[0]}.npz").exists()
    # Only ids as the server makes them name a file: nothing else is read.
    (tmp_path / "elsewhere.npz").write_bytes(b"not an answer")
    assert reader.get("../elsewhere") is None and reader.get("audio_x") is None
    # A file its writer never removed (it stopped) goes once it is older than an answer's lifetime.
    old = time.time() - AUDIO_LIFETIME_SECONDS - 10
    os.utime(folder / f"{ids[1]}.npz", (old, old))
    reader._sweep(time.time() - reader.lifetime)
    assert not (folder / f"{ids[1]}.npz").exists() and (folder / f"{ids[2]}.npz").exists()
