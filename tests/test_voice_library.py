"""The voice library on disk: atomic writes, recovery after a crash, quotas, names."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import ROOT

from audio import Audio
from generation import AudioCodes
from voices import VoiceChanged, VoiceExists, VoiceLibrary, VoiceQuotaExceeded, check_voice_name


def clip(seconds: float = 2.0, freq: float = 220.0) -> Audio:
    t = np.arange(int(24000 * seconds)) / 24000
    return Audio((0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 24000)


def codes() -> AudioCodes:
    return AudioCodes(torch.arange(8 * 50).reshape(8, 50) % 1024)


def test_create_read_and_codes_round_trip(tmp_path):
    library = VoiceLibrary(tmp_path)
    voice = library.create("anna", clip(), "  Hello   there. ", codes())
    again = VoiceLibrary(tmp_path).get("anna")
    assert again == library.get(voice.id) and again.transcript == "Hello there."
    assert abs(again.duration - 2.0) < 0.01 and not again.builtin
    assert torch.equal(library.codes(again).codes, codes().codes)
    assert np.allclose(library.audio(again).samples, clip().samples, atol=1e-4)
    assert (tmp_path / "anna.wav").is_file() and (tmp_path / "anna.txt").is_file()


def test_a_deleted_voice_leaves_nothing_behind_in_memory(tmp_path):
    """A soak trial found the clips' hashes kept for every name ever stored: throw-away voice names grew
    the process for its life."""
    library = VoiceLibrary(tmp_path)
    for i in range(3):
        library.create(f"throwaway{i}", clip(), "Hello.", codes())
        assert library.get(f"throwaway{i}").digest
        assert library.delete(f"throwaway{i}")
    assert library._digests == {}


def test_codes_follow_the_clip(tmp_path):
    library = VoiceLibrary(tmp_path)
    library.create("anna", clip(), "Hello.", codes())
    import soundfile as sf

    sf.write(tmp_path / "anna.wav", clip(freq=330).samples, 24000)  # replaced by hand
    assert library.codes(library.get("anna")) is None


def test_clips_placed_by_hand_whose_names_differ_in_case_are_one_voice(tmp_path, caplog):
    import soundfile as sf

    for name, freq in (("Dup", 220.0), ("dup", 330.0)):
        sf.write(tmp_path / f"{name}.wav", clip(freq=freq).samples, 24000)
        (tmp_path / f"{name}.txt").write_text(f"Said by {name}.")
    library = VoiceLibrary(tmp_path)
    (voice,) = library.list()
    assert voice.name == "Dup" and voice.transcript == "Said by Dup."
    assert library.get("dup") == library.get("DUP") == library.get(voice.id) == voice
    assert caplog.text.count("dup.wav ignored") == 1  # once, not at every use


def test_voice_files_placed_by_hand_that_cannot_be_read_are_left_out_not_a_500(fake_client, tmp_path, caplog):
    """Any NAME.wav + NAME.txt in the folder is a voice; one that was not audio (or empty, or of no samples),
    or whose transcript was not UTF-8, made every list, every create and every unknown voice a 500."""
    import soundfile as sf

    folder = tmp_path / "voices"
    sf.write(folder / "good.wav", clip().samples, 24000)
    (folder / "good.txt").write_text("Said well.")
    (folder / "noise.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    (folder / "empty.wav").write_bytes(b"")
    sf.write(folder / "nothing.wav", np.zeros(0, dtype=np.float32), 24000)
    sf.write(folder / "latin.wav", clip().samples, 24000)
    (folder / "latin.txt").write_bytes(b"caf\xe9 words")
    for name in ("noise", "empty", "nothing"):
        (folder / f"{name}.txt").write_text("words")
    for _ in range(2):
        listed = fake_client.get("/v1/audio/voices")
        assert listed.status_code == 200 and [v["name"] for v in listed.json()["data"]] == ["good"]
    for name in ("noise", "empty", "nothing", "latin"):
        assert caplog.text.count(f"voice {name} ignored: its files cannot be read") == 1  # once each
    speech = {"model": "tts-1", "input": "Hi.", "voice": "latin"}
    assert fake_client.post("/v1/audio/speech", json=speech).status_code == 400  # an unknown voice
    made = fake_client.post(
        "/v1/audio/voices", data={"name": "fresh", "transcript": "Hello there."},
        files={"audio_sample": ("a.wav", (ROOT / "test_audio.wav").read_bytes(), "audio/wav")},
    )  # fmt: skip
    assert made.status_code == 200, made.text


def test_deleting_a_voice_leaves_the_codes_of_voices_whose_names_extend_its_own(tmp_path):
    """Voice ``a``'s codes are ``a.<hash>.npy``; its deletion took ``a.b``'s (``a.b.<hash>.npy``) too."""
    library = VoiceLibrary(tmp_path)
    for name in ("a", "a.b", "a.txt"):
        library.save_codes(library.create(name, clip(freq=200 + len(name)), "Hello there.", None), codes())
    library.delete("a")
    for name in ("a.b", "a.txt"):
        assert library.codes(library.get(name)) is not None, name
    left = sorted(p.name for p in (tmp_path / ".voices").glob("*.npy"))
    assert [n.rsplit(".", 2)[0] for n in left] == ["a.b", "a.txt"]  # a's own went


def test_duplicates_and_quotas_write_nothing(tmp_path):
    library = VoiceLibrary(tmp_path, max_voices=1)
    library.create("anna", clip(), "Hello.")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(VoiceExists, match="a voice named 'anna' already exists .names are the same whatever"):
        library.create("ANNA", clip(), "Hello.")  # the stored name, not the one asked for (it said 'ANNA')
    with pytest.raises(VoiceQuotaExceeded):
        library.create("bob", clip(), "Hello.")
    assert sorted(tmp_path.rglob("*")) == before
    small = VoiceLibrary(tmp_path / "small", max_bytes=50_000)
    with pytest.raises(VoiceQuotaExceeded):
        small.create("bob", clip(), "Hello.")
    assert small.list() == []


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", ".x", "", "x" * 65, "default", "Clone", "a..b"])
def test_bad_names(name):
    with pytest.raises(ValueError) as refused:
        check_voice_name(name)
    if name == "a..b":  # the rule it breaks is stated (the message stated only rules it meets)
        assert "without '..'" in str(refused.value)


CRASH = """
import os, sys
sys.path.insert(0, {root!r})
import numpy as np
import voices
from audio import Audio
from pathlib import Path
calls = 0
def dying(real):
    def step(*args, **kwargs):
        global calls
        calls += 1
        if calls == {crash_at}:
            os._exit(9)  # the process dies here, mid-write
        return real(*args, **kwargs)
    return step
if {delete}:
    Path.unlink = dying(Path.unlink)
else:
    voices.os.replace = dying(os.replace)
library = voices.VoiceLibrary({folder!r})
if {delete}:
    library.delete("anna")
else:
    library.create("bob", Audio(np.full(48000, 0.1, dtype=np.float32), 24000), "Bob speaks.")
"""


def crash(folder, crash_at: int, delete: bool) -> None:
    script = CRASH.format(root=str(ROOT), folder=str(folder), crash_at=crash_at, delete=delete)
    assert subprocess.run([sys.executable, "-c", textwrap.dedent(script)], timeout=120).returncode == 9


@pytest.mark.parametrize("crash_at", [2, 3, 4], ids=["after marker", "after audio", "after transcript"])
def test_a_create_killed_midway_leaves_the_old_state(tmp_path, crash_at):
    library = VoiceLibrary(tmp_path)
    library.create("anna", clip(), "Anna speaks.", codes())
    crash(tmp_path, crash_at, delete=False)
    assert [v.name for v in library.list()] == ["anna"]  # readable while the leftovers are still there
    restarted = VoiceLibrary(tmp_path)
    assert [v.name for v in restarted.list()] == ["anna"]
    assert torch.equal(restarted.codes(restarted.get("anna")).codes, codes().codes)
    leftovers = [p.name for p in tmp_path.rglob("*") if "bob" in p.name or p.name.startswith(".tmp")]
    assert leftovers == []
    restarted.create("bob", clip(), "Bob speaks.")  # the name is free again
    assert [v.name for v in restarted.list()] == ["anna", "bob"]


def test_a_delete_killed_midway_completes_at_start(tmp_path):
    library = VoiceLibrary(tmp_path)
    library.create("anna", clip(), "Anna speaks.", codes())
    library.create("carl", clip(), "Carl speaks.")
    crash(tmp_path, 2, delete=True)  # the marker is written, the audio removed, the rest not
    assert [v.name for v in library.list()] == ["carl"]
    restarted = VoiceLibrary(tmp_path)
    assert [v.name for v in restarted.list()] == ["carl"]
    assert not [p for p in tmp_path.rglob("anna*")]


# ---- one library shared by several processes (Ray replicas, machines sharing the folder) ----

RACE = """
import sys, time
sys.path.insert(0, {root!r})
import numpy as np
from audio import Audio
import voices
from voices import VoiceExists, VoiceLibrary
write = voices._write_atomic
def slow_write(path, data):
    time.sleep(0.3)  # a slow shared disk: every check-then-write window is wide open
    write(path, data)
voices._write_atomic = slow_write
library = VoiceLibrary({folder!r})
while time.time() < {start}:
    time.sleep(0.001)
try:
    library.create("same", Audio(np.full(48000, {level}, dtype=np.float32), 24000), "Process {level}.")
    print("created")
except VoiceExists:
    print("exists")
"""


def test_concurrent_creates_in_several_processes_store_one_voice(tmp_path):
    import time

    VoiceLibrary(tmp_path)
    start = time.time() + 8  # every process has imported torch and waits on the same instant
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                RACE.format(root=str(ROOT), folder=str(tmp_path), start=start, level=level),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for level in (0.1, 0.2, 0.3, 0.4)
    ]
    answers = sorted(p.communicate(timeout=120)[0].strip() for p in processes)
    assert answers == ["created", "exists", "exists", "exists"]
    voice = VoiceLibrary(tmp_path).get("same")
    level = float(voice.transcript.split()[1].rstrip("."))
    assert np.allclose(VoiceLibrary(tmp_path).audio(voice).samples, level, atol=1e-3)  # files of one writer


def test_a_deletion_is_seen_at_once_by_another_process_and_takes_the_codes(tmp_path):
    mine, theirs = VoiceLibrary(tmp_path), VoiceLibrary(tmp_path)
    mine.create("anna", clip(), "Anna speaks.", codes())
    voice = theirs.get("anna")
    assert theirs.codes(voice) is not None
    mine.delete("anna")
    assert theirs.get("anna") is None and theirs.codes(voice) is None
    theirs.save_codes(voice, codes())  # an encode that finished after the delete stores nothing
    assert not list(tmp_path.rglob("anna*"))


def test_codes_never_outlive_or_mismatch_their_voice(tmp_path):
    mine, theirs = VoiceLibrary(tmp_path), VoiceLibrary(tmp_path)
    mine.create("anna", clip(), "Anna speaks.")
    old = theirs.get("anna")  # read before another process replaces the voice
    mine.delete("anna")
    mine.create("anna", clip(freq=330), "Anna again.")
    with pytest.raises(VoiceChanged):
        theirs.audio(old)  # the clip it was read with is gone
    theirs.save_codes(old, codes())  # codes of the old clip are not stored under the new one
    new = theirs.get("anna")
    assert new.digest != old.digest and theirs.codes(new) is None and theirs.codes(old) is None
    theirs.save_codes(new, codes())
    assert torch.equal(mine.codes(mine.get("anna")).codes, codes().codes)
