#!/usr/bin/env bash
# Regenerate the speech fixtures used by tests/test_stt.py (and test_audio.wav at the repo root).
#
# Needs espeak-ng (1.51) and sox (14.4) on PATH; the test suite itself does NOT need them,
# the generated WAVs are committed.  Output is deterministic: espeak-ng is a rule-based
# synthesiser, and sox runs with -D (no dither) and -R (repeatable), so rerunning this
# script with the same tool versions gives byte-identical files.
#
# Files written (all mono, 16-bit PCM):
#   test_audio.wav                    24 kHz, espeak-ng voice en-us (default male), default speed/pitch
#   tests/fixtures/speech_female.wav  16 kHz, espeak-ng voice en-gb+f3, slower, higher pitch
#   tests/fixtures/transcripts.json   {"<file name>": "<text spoken>"}
#   tests/fixtures/speech_german.wav  16 kHz, espeak-ng voice de, for translation (not in transcripts.json,
#                                     whose clips are all English); its text and meaning are in
#   tests/fixtures/translations.json  {"<file name>": {"language", "text", "english"}}
#
# The keys of transcripts.json are bare file names: "test_audio.wav" lives at the repository
# root, every other key names a file in tests/fixtures/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FIX="$ROOT/tests/fixtures"
mkdir -p "$FIX"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

MALE_TEXT="We need to finish the report before the meeting on Friday morning."
FEMALE_TEXT="My favorite color is green and I like to walk in the park."
GERMAN_TEXT="Guten Morgen. Ich trinke jeden Tag Kaffee mit Milch."
GERMAN_ENGLISH="Good morning. I drink coffee with milk every day."

# synth VOICE SPEED PITCH TEXT RATE OUT
synth() {
    local voice="$1" speed="$2" pitch="$3" text="$4" rate="$5" out="$6"
    espeak-ng -v "$voice" -s "$speed" -p "$pitch" -w "$TMP/raw.wav" "$text"
    # Trim leading/trailing silence above 0.1 s, then pad 0.3 s each side, mono, resample, 16-bit.
    sox -D -R -V1 "$TMP/raw.wav" -c 1 -b 16 -e signed-integer "$out" \
        silence 1 0.05 0.1% reverse silence 1 0.05 0.1% reverse \
        pad 0.3 0.3 rate -v "$rate"
}

synth en-us 160 50 "$MALE_TEXT" 24000 "$ROOT/test_audio.wav"
synth en-gb+f3 140 70 "$FEMALE_TEXT" 16000 "$FIX/speech_female.wav"
synth de 140 50 "$GERMAN_TEXT" 16000 "$FIX/speech_german.wav"

cat > "$FIX/transcripts.json" <<JSON
{
  "test_audio.wav": "$MALE_TEXT",
  "speech_female.wav": "$FEMALE_TEXT"
}
JSON

cat > "$FIX/translations.json" <<JSON
{
  "speech_german.wav": {"language": "de", "text": "$GERMAN_TEXT", "english": "$GERMAN_ENGLISH"}
}
JSON

for f in "$ROOT/test_audio.wav" "$FIX/speech_female.wav" "$FIX/speech_german.wav"; do
    printf '%s: %s s, %s Hz, %s bytes\n' "${f#"$ROOT"/}" "$(soxi -D "$f")" "$(soxi -r "$f")" "$(stat -c %s "$f")"
done
