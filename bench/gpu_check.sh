#!/usr/bin/env bash
# Issue 11's GPU figures in one call of the device tool, on the full-size random-weight model that
# ../shared/gpu-bench builds (the real architecture; every timing is real, the audio is noise):
#   0. bench/check_cuda.py on the tiny model: the CUDA graphs are captured, and answer as the eager step does;
#      the steps are timed on the GPU; in bfloat16, attention by each row's length passes its check;
#   1. the service under load (bench/load.py, 10 s speech requests streamed as pcm): 1 stream alone, then
#      4 and 16 at once (16 twice: 32 and 96 requests, the second nearer the steady state); the load
#      "16:96v" (GPU_CHECK_LOADS) gives 16 clients texts of varied lengths (7 to 13 s, 10 s on average: with
#      random weights every request runs to its cap, so requests of one text end together and their
#      clients send again together, where real texts differ): audio seconds
#      per second, first audio p50/p95, latency (per-stream RTF = latency over the audio's length); the
#      server's /metrics after each (steps, the loop's time by work, the GPU's time and waits per step, a
#      request's time in the line, its fill, its decoding and its last audio: what leaves a slot empty);
#      then a server that prefills eagerly (HIGGS_PREFILL_GRAPHS=false, against the default's graphs of
#      padded prompts), one whose codec takes later pieces as they come (HIGGS_CODEC_GATHER_MS=0, against
#      the default's 40 ms gather) and one that launches one step ahead (HIGGS_LOOKAHEAD_STEPS=1, against
#      the default's 2), side by side (GPU_CHECK_SERVERS and GPU_CHECK_LOADS name other servers,
#      e.g. "switch SWITCH=0.0005" for Python's switch interval at 0.5 ms (bench/bench_lock.py), or
#      another revision's, and loads);
#   2. a prefill alone at 1, 4 and 8 prompts, and at 1 and 8 with a voice reference, with the engine's
#      choices undone side by side, and where its time goes (bench/bench_prefill.py);
#   3. one decoding step alone at 1 and 16 rows, 512 and 1,024 positions, with attention masked and by
#      each row's length side by side, and where an eager step's time goes (bench/bench_step.py;
#      GPU_CHECK_STEP_ARGS replaces its arguments).
# GPU_CHECK_SKIP="cuda load prefill step" leaves out the parts named (a second call after a first that
# measured some). On an H200 (2026-11-27) parts 0-2 took 224 s with both servers, parts 0, 1 (one server)
# and 3 229 s; the call's start-up is about 30 s more, and a fresh machine builds the model again (30-40 s).
# On 2026-11-28 parts 0, 1 (two servers, loads "1:2 16:96") and 3 took 289 s, and the device tool's lease
# 336 s from asking to the end of the call.
#
# Prepare on this machine, once a session:
#   grep -qx '/.gpu-bench/' .git/info/exclude 2>/dev/null || echo /.gpu-bench/ >> .git/info/exclude
#   rm -rf .gpu-bench && cp -r ../shared/gpu-bench .gpu-bench && .gpu-bench/fetch-wheels.sh .gpu-bench/whl
#   bash bench/gpu_check.sh --fetch-extra        # the service's wheels that the kit's list lacks
# then the device tool's `run` with carry [".gpu-bench"], timeout_s 560 and the command
#   bash bench/gpu_check.sh
# Results: $OUT/gpu_check.txt (written as they come: a cut run returns what it had), the server's log in
# $OUT/server-*.log. Dry run on this CPU (tiny model, float32, about 5 minutes):
#   GPU_CHECK_TINY=1 OUT=/tmp/gpu-check bash bench/gpu_check.sh
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
KIT=.gpu-bench
EXTRA="prometheus-client==0.26.0 sentencex==1.0.32 regex==2026.11.19"

if [ "${1:-}" = "--fetch-extra" ]; then
  for spec in $EXTRA; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d "$KIT/whl" "$spec" || exit 1
  done
  ls "$KIT/whl" | wc -l
  exit 0
fi

OUT=$(realpath -m "${OUT:-/tmp/gpu-check}")
mkdir -p "$OUT"
RESULTS="$OUT/gpu_check.txt"
: > "$RESULTS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ "${GPU_CHECK_TINY:-}" = "1" ]; then
  PY=$PWD/.venv/bin/python WORK=/tmp/gpu-check-tiny DEVICE=cpu DTYPE=float32 BUILD=(--tiny) SECONDS_OF_SPEECH=2
  LONGEST_SPEECH=2  # (the varied texts are all cut to 2 s here)
else
  PY=python3 WORK=/tmp/full DEVICE=cuda DTYPE=bfloat16 BUILD=() SECONDS_OF_SPEECH=10
  LONGEST_SPEECH=13  # the varied texts' longest: 4 s + 0.15 s a character (HIGGS_SECONDS_PER_CHARACTER) x 60
fi
PORT=18731
say() { echo "$*" | tee -a "$RESULTS"; }
run() {  # run LIMIT_SECONDS COMMAND...: its output into the results, cut after LIMIT_SECONDS
  local limit=$1
  shift
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$RESULTS"
}

say "== gpu_check $(date -u '+%F %T') UTC, $(git log -1 --format='%h %s' | cut -c1-80), $(nproc) CPUs"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee -a "$RESULTS"
if [ "$DEVICE" = cuda ]; then
  rm -rf /tmp/site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$KIT"/whl/*.whl \
    || say "wheel install FAILED"
  export PYTHONPATH="/tmp/site:$PWD/$KIT/stubs"
  # the kit's stand-in faster_whisper lacks the voice-activity module that stt.py imports (recognition is off)
  [ -f "$KIT/stubs/faster_whisper/vad.py" ] || printf '%s\n' "class VadOptions:" \
    "    speech_pad_ms = 400" "    def __init__(self, *args, **kwargs): pass" "def get_speech_timestamps(*args, **kwargs):" \
    "    raise RuntimeError('faster-whisper is stubbed out in the GPU bench')" > "$KIT/stubs/faster_whisper/vad.py"
fi
SKIP="${GPU_CHECK_SKIP:-}"  # any of "cuda load prefill step": the parts left out

# ---- 0. the CUDA paths, on the tiny model ----
for dtype in float32 bfloat16; do
  [[ $SKIP == *cuda* ]] && break
  say "-- check_cuda, $dtype"
  run 150 "$PY" bench/check_cuda.py --device "$DEVICE" --dtype $dtype
done

if [ ! -f "$WORK/model/config.json" ]; then
  t=$SECONDS
  GPU_BENCH_PROJ=$PWD timeout 300 "$PY" "$KIT/build_model.py" "$WORK" "${BUILD[@]}" > "$OUT/build.log" 2>&1 \
    || { say "model build FAILED"; tail -20 "$OUT/build.log" | tee -a "$RESULTS"; exit 1; }
  say "model built in $((SECONDS - t)) s: $(grep '^BUILD ' "$OUT/build.log" | cut -c1-160)"
fi
export HF_HUB_CACHE="$WORK/hf-cache"
MODEL=(--model "$WORK/model" --audio-tokenizer "$WORK/audio_tokenizer" --device "$DEVICE" --dtype "$DTYPE")

# ---- 1. the service under load ----
serve_and_load() {  # serve_and_load LABEL "LOADS" [TREE=DIR] [SWITCH=S] [VAR=VALUE...]: it, under LOADS
  local label=$1 loads=$2 t=$SECONDS tree=. from="" start=(app.py)
  shift 2
  if [[ ${1:-} == TREE=* ]]; then  # another revision's app.py (e.g. one unpacked into the kit by git archive)
    tree=${1#TREE=} from=" from ${1#TREE=}"
    shift
  fi
  if [[ ${1:-} == SWITCH=* ]]; then  # Python's switch interval (sys.setswitchinterval; 0.005 s by default)
    from="$from, switch interval ${1#SWITCH=} s"
    start=(-c "import runpy, sys; sys.setswitchinterval(${1#SWITCH=}); print('switch interval', sys.getswitchinterval()); runpy.run_path('app.py', run_name='__main__')")
    shift
  fi
  cd "$tree" || { say "server ($label): no folder $tree"; return; }
  env -u HIGGS_API_KEY HIGGS_MODEL="$WORK/model" HIGGS_AUDIO_TOKENIZER="$WORK/audio_tokenizer" \
    HIGGS_DEVICE="$DEVICE" HIGGS_DTYPE="$DTYPE" HIGGS_STT_MODEL= HIGGS_VOICES_DIR="$WORK/voices" \
    HIGGS_HOST=127.0.0.1 HIGGS_PORT=$PORT HIGGS_MAX_AUDIO_SECONDS=$LONGEST_SPEECH "$@" \
    "$PY" "${start[@]}" > "$OUT/server-$label.log" 2>&1 &
  server=$!
  cd - > /dev/null
  trap 'kill $server 2> /dev/null' EXIT
  for _ in $(seq 360); do
    curl -sf "http://127.0.0.1:$PORT/ready" > /dev/null && break
    kill -0 $server 2> /dev/null || break
    sleep 0.5
  done
  if ! curl -sf "http://127.0.0.1:$PORT/ready" > /dev/null; then
    say "server ($label) NOT READY after $((SECONDS - t)) s"
    tail -30 "$OUT/server-$label.log" | tee -a "$RESULTS"
  else
    say "server ($label$from: $*) ready in $((SECONDS - t)) s"
    grep -E "loaded |slots|captured|warm-up done|prefill|attention by|switch interval" "$OUT/server-$label.log" | cut -c1-300 | tee -a "$RESULTS"
    say "graph captures that failed: $(grep -c "capture failed\|capture of the codec failed" "$OUT/server-$label.log")"
    text="Please read this short line out loud now"  # 40 characters; the cap makes each answer its full length
    for load in $loads; do  # at once:requests in all, and "v" for texts of varied lengths
      local n total varied=()
      [[ $load == *v ]] && varied=(--text-lengths 20:60) load=${load%v}
      n=${load%:*} total=${load#*:}
      if [ ${#varied[@]} -gt 0 ]; then
        say "-- ($label) $n at once, $total requests of 20 to 60 characters: 7 to 13 s of speech, 10 s on average, at most $LONGEST_SPEECH s here (pcm, streamed)"
      else
        say "-- ($label) $n at once, $total requests of ${SECONDS_OF_SPEECH} s speech (pcm, streamed)"
      fi
      run 150 "$PY" bench/load.py --base-url "http://127.0.0.1:$PORT" --concurrency $n --requests $total \
        --mix speech --text "$text" "${varied[@]}" --timeout 120 --max-seconds 120
      curl -s "http://127.0.0.1:$PORT/metrics" | grep -E "^higgs_(decode_steps_total|scheduler_seconds_total|prefill|codec_(seconds|calls|pieces)_total|step_gpu|batch_slots|(generation(_phase)?|queue_wait)_seconds_(sum|count))" \
        | tee -a "$RESULTS"
    done
    grep -E "ERROR|CRITICAL|Traceback" "$OUT/server-$label.log" | head -5 | tee -a "$RESULTS"
  fi
  kill $server 2> /dev/null
  wait $server 2> /dev/null
}
# GPU_CHECK_SERVERS: one server a line, "LABEL [TREE=DIR] [SWITCH=S] [VAR=VALUE ...]", each under
# GPU_CHECK_LOADS ("at once:requests"); SWITCH sets Python's switch interval in the server (seconds: how
# long a thread that wants the interpreter lock waits before it asks for it); TREE runs the app.py of DIR,
# e.g. an earlier revision for a side-by-side:
#   mkdir -p .gpu-bench/old && git archive REV | tar -x -C .gpu-bench/old   (then "old TREE=.gpu-bench/old")
SERVERS="${GPU_CHECK_SERVERS:-default
eagerfill HIGGS_PREFILL_GRAPHS=false
nogather HIGGS_CODEC_GATHER_MS=0
ahead1 HIGGS_LOOKAHEAD_STEPS=1}"
LOADS="${GPU_CHECK_LOADS:-1:2 4:8 16:32 16:96}"  # and "16:96v" (each load adds 10-20 s a server)
if [[ $SKIP != *load* ]]; then
  while read -r label settings; do
    # shellcheck disable=SC2086  # the settings are words
    [ -n "$label" ] && serve_and_load "$label" "$LOADS" $settings < /dev/null
  done <<< "$SERVERS"
fi

# ---- 2. a prefill alone ----
if [[ $SKIP != *prefill* ]]; then
  say "-- bench_prefill: 1, 4 and 8 prompts; then 1 and 8 with a 3 s voice reference"
  run 150 "$PY" bench/bench_prefill.py "${MODEL[@]}" --rows 1 4 8
  run 150 "$PY" bench/bench_prefill.py "${MODEL[@]}" --rows 1 8 --reference 3
fi

# ---- 3. the step alone ----
if [[ $SKIP != *step* ]]; then
  say "-- bench_step: 1 and 16 rows"
  # shellcheck disable=SC2086
  run 200 "$PY" bench/bench_step.py "${MODEL[@]}" ${GPU_CHECK_STEP_ARGS:---rows 1 16 --lengths 512 1024 --steps 100 --by-lengths --profile}
fi
say "== done in $SECONDS s"
