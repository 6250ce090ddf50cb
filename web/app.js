// The page's behaviour: voices, speaking with streamed playback, the reference clip, the library.

import { ApiError, apiKey, dataUrl, events, fromBase64, request, Unreachable } from "./api.js";
import { playerFor, streamsLive, wireFormat } from "./player.js";
import { canRecord, startRecording } from "./recorder.js";

const OPENAI_VOICES = ["alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer",
  "verse", "marin", "cedar"];
const CLIP = ":clip"; // the voice option that clones the reference clip once (no voice name starts with ":")
const DEFAULT_LIMIT = 4096; // OpenAI's, when the API's schema does not say
// The service's own limits on a clip (its schema's `info["x-higgs-limits"]`), and the defaults when unsaid.
const DEFAULT_UPLOAD_BYTES = 25 * 1024 * 1024;
const DEFAULT_REFERENCE_SECONDS = 30;
const RECORD_SECONDS = 30; // a recording stops by itself after this long
// The page's field for each request parameter that the API's errors name (`param`), per request.
const SPEECH_FIELDS = {
  input: "text",
  voice: "voice",
  response_format: "format",
  speed: "speed",
  instructions: "instructions",
};
const STORE_FIELDS = { name: "voice-name", transcript: "voice-transcript", audio_sample: "clip-file" };
const TRANSCRIBE_FIELDS = { file: "clip-file" };

const $ = (id) => document.getElementById(id);
const state = {
  voices: [],
  clip: null,
  limit: DEFAULT_LIMIT,
  uploadBytes: DEFAULT_UPLOAD_BYTES,
  referenceSeconds: DEFAULT_REFERENCE_SECONDS,
  speaking: null,
  sounding: null, // the Web Audio player still playing an answer whose stream has ended (wav, pcm, clone)
  recording: null,
  errorFrom: null, // the control that was focused when the error showed, focused again when it is dismissed
  invalid: null, // the field the error shown concerns (marked aria-invalid)
  staleError: false, // whether the error shown says the service was loading or unreachable
  readiness: null, // the timer of the next readiness check
  ready: null, // what the last readiness check said (null before the first)
  listed: null, // the voices the library shows, as JSON (it is rendered again only when they change)
};

// One sound at a time: the generated speech, a voice's sample and the clip pause each other (speech
// streamed through Web Audio pauses the others when it starts, see the Speak handler, and is silenced by
// them, also after its stream ended).
const players = ["player", "sample-player", "clip-player"].map($);
function hush(except = null) {
  players.filter((p) => p !== except).forEach((p) => p.pause());
  state.sounding?.silence();
}
for (const player of players) player.addEventListener("play", () => hush(player));

// A button at work is turned off with aria-disabled, not `disabled`, and ignores presses: Chromium takes the
// focus off a button that is disabled, and a keyboard user would start again at the page's top.
function setOff(button, off) {
  if (off) button.setAttribute("aria-disabled", "true");
  else button.removeAttribute("aria-disabled");
}
const isOff = (button) => button.getAttribute("aria-disabled") === "true";

/** Whether the keyboard can be put back on `element`: still on the page, shown, and not disabled. */
function canFocus(element) {
  return Boolean(
    element?.isConnected && element !== document.body && !element.disabled && element.getClientRects().length,
  );
}

// ---- errors and the API key ----

/** Shows `err`; `fields` maps the request's parameters to the page's fields, for the one the API names;
 * `voice` is the voice the request was about, if any (its name, where the API was given its id). */
function showError(err, fields = {}, voice = null) {
  if (err?.name === "AbortError") return;
  $("error-text").textContent = inPageWords(err, voice);
  $("error").hidden = false;
  state.errorFrom = document.activeElement;
  markInvalid(err instanceof ApiError && err.param ? fields[err.param] : null);
  state.staleError = err instanceof Unreachable || (err instanceof ApiError && err.status === 503);
  // The message is above the cards: bring it into view from wherever the button pressed was.
  $("error").scrollIntoView({ block: "nearest" });
  if (err instanceof ApiError && err.status === 401) askForKey();
  // The service may be gone, or loading again after a restart: the pill says which at once.
  if (state.staleError) watchReadiness();
  // A voice deleted elsewhere since the list was loaded: the list follows the library.
  if (err instanceof ApiError && (err.param === "voice" || err.code === "voice_not_found")) {
    loadVoices().catch(() => {});
  }
}

/** The API's message, or the page's own words where the API's speak of HTTP or of the API's terms (a header
 * to send, a request body, a voice's id), for which the page has a form, a button or a name. */
function inPageWords(err, voice) {
  if (!(err instanceof ApiError)) return `Something went wrong: ${err}`;
  if (err.status === 401) {
    return apiKey.get()
      ? "That API key is not valid here; enter the key this server was given."
      : "This server needs an API key; enter it below.";
  }
  if (err.code === "voice_not_found" && voice) {
    return `The voice “${voice}” is not in the library any more (deleted elsewhere?); choose another.`;
  }
  const builtin = state.voices.find((v) => v.builtin && v.name.toLowerCase() === voice?.toLowerCase());
  if (err.code === "voice_exists" && builtin) {
    const made = `The service made the voice “${builtin.name}” when that name was first used`;
    return `${made}; to store your clip under that name, delete that voice in the library first.`;
  }
  if (err.code === "request_too_large" || err.code === "file_too_large") {
    return `The clip is too large: the service takes files up to ${size(state.uploadBytes)}.`;
  }
  return err.message;
}

/** `bytes` as people read a file's size. */
function size(bytes) {
  if (bytes < 1024) return `${bytes} byte${bytes === 1 ? "" : "s"}`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(0)} KB`;
  return `${(bytes / (1024 * 1024)).toFixed(1)} MB`;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
  markInvalid(null);
}

/** Marks the field with id `id` (none when null) as the one the error concerns, described by its message. */
function markInvalid(id) {
  const was = state.invalid;
  if (was) {
    was.removeAttribute("aria-invalid");
    const rest = was.getAttribute("aria-describedby").split(" ").filter((t) => t && t !== "error-text");
    if (rest.length) was.setAttribute("aria-describedby", rest.join(" "));
    else was.removeAttribute("aria-describedby");
  }
  const field = id ? $(id) : null;
  state.invalid = field;
  if (!field) return;
  field.setAttribute("aria-invalid", "true");
  const described = (field.getAttribute("aria-describedby") || "").split(" ").filter(Boolean);
  field.setAttribute("aria-describedby", [...described, "error-text"].join(" "));
}

function askForKey() {
  const form = $("key-form");
  const first = form.hidden;
  form.hidden = false;
  $("api-key").value = apiKey.get();
  if (first) $("api-key").focus();
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  apiKey.set($("api-key").value.trim());
  clearError();
  await load();
});

/** The API answered with the key: the form goes, whichever load it was (the form's, or the one when the
 * service turned Ready, for a key entered while the model loaded). */
function keyWorks() {
  const form = $("key-form");
  if (form.hidden) return;
  const inForm = form.contains(document.activeElement);
  form.hidden = true;
  if (inForm) $("text").focus(); // not back to the top of the page with the form that went
}
function dismissError() {
  clearError();
  const back = state.errorFrom;
  // Stop goes when the speech does (it had the focus while generating): Speak then; else the text.
  const fallback = back === $("stop") ? $("speak") : $("text");
  (canFocus(back) ? back : fallback).focus();
}
$("error-close").addEventListener("click", dismissError);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && !$("error").hidden) dismissError();
});

// ---- readiness, limits, voices ----

/** Checks /ready now and then again: every 3 s while the model loads, 5 s while the service cannot be
 * reached, 15 s while it is ready (so that the pill notices a service that went away). */
async function watchReadiness() {
  clearTimeout(state.readiness);
  let next;
  const was = state.ready;
  try {
    const response = await fetch("/ready");
    const ready = response.ok;
    setPill(ready ? "Ready" : "Model loading…", ready ? "ready" : "loading");
    next = ready ? 15000 : 3000;
    state.ready = ready;
  } catch {
    setPill("Offline", "offline");
    next = 5000;
    state.ready = false;
  }
  if (state.ready && was === false) {
    // Ready again (or at last): what failed meanwhile is loaded now, and its error goes.
    if (state.staleError) clearError();
    load();
  }
  clearTimeout(state.readiness); // a check started meanwhile (after an error) schedules one timer only
  state.readiness = setTimeout(watchReadiness, next);
}

function setPill(text, pillState) {
  const pill = $("status");
  if (pill.textContent !== text) pill.textContent = text; // a live region: the same words are not news
  pill.dataset.state = pillState;
}

async function loadLimit() {
  // The API's own schema states the speech input limit; OpenAI's 4096 when it does not (or is not served).
  let schema = null;
  try {
    schema = await (await request("/openapi.json")).json();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) throw err;
  }
  const fields = schema?.components?.schemas?.SpeechRequest?.properties;
  const limit = fields?.input?.maxLength;
  state.limit = Number.isInteger(limit) ? limit : DEFAULT_LIMIT;
  // instructions: a string or null, each with its own schema
  const instructions = [fields?.instructions, ...(fields?.instructions?.anyOf ?? [])]
    .map((f) => f?.maxLength)
    .find(Number.isInteger);
  $("instructions").maxLength = instructions ?? DEFAULT_LIMIT;
  const limits = schema?.info?.["x-higgs-limits"];
  state.uploadBytes = Number.isInteger(limits?.upload_bytes) ? limits.upload_bytes : DEFAULT_UPLOAD_BYTES;
  const seconds = limits?.reference_seconds;
  state.referenceSeconds = Number.isFinite(seconds) ? seconds : DEFAULT_REFERENCE_SECONDS;
  updateCount();
}

async function loadVoices() {
  let data;
  try {
    ({ data } = await (await request("/v1/audio/voices")).json());
  } catch (err) {
    // Not "No stored voices yet": nothing is known about them (a list loaded before stays shown).
    if (state.listed === null) $("voices-empty").textContent = "The voices could not be loaded.";
    throw err;
  }
  state.voices = data;
  renderVoiceSelect();
  renderLibrary();
}

/** Loads what needs the API; true when it answered. */
async function load() {
  try {
    await Promise.all([loadVoices(), loadLimit()]);
    keyWorks();
    return true;
  } catch (err) {
    showError(err);
    return false;
  }
}

function option(value, text) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = text;
  return element;
}

function renderVoiceSelect() {
  const select = $("voice");
  const previous = select.value || "alloy";
  select.replaceChildren();
  const stored = state.voices.filter((v) => !v.builtin);
  const named = new Set(stored.map((v) => v.name));
  if (stored.length) {
    const group = document.createElement("optgroup");
    group.label = "Stored voices";
    stored.forEach((v) => group.append(option(v.name, v.name)));
    select.append(group);
  }
  const builtins = document.createElement("optgroup");
  builtins.label = "OpenAI names";
  OPENAI_VOICES.filter((n) => !named.has(n)).forEach((n) => builtins.append(option(n, n)));
  select.append(builtins);
  const other = document.createElement("optgroup");
  other.label = "Other";
  other.append(option("default", "default (model’s choice)"));
  const why = state.clip ? "clone once" : "upload or record one first"; // why it cannot be chosen yet
  const clip = option(CLIP, `the reference clip (${why})`);
  clip.disabled = !state.clip;
  other.append(clip);
  select.append(other);
  const still = [...select.options].find((o) => o.value === previous && !o.disabled);
  select.value = still ? previous : "alloy";
}

function renderLibrary() {
  // Speaking with an OpenAI name reloads the voices, and so does the pill turning Ready: the keyboard may be
  // on one of these buttons. Nothing changed, nothing is rendered; else the focus goes to the same button
  // (by its place in the item) of the same voice, or to Refresh when that voice went.
  const listed = JSON.stringify(state.voices);
  if (listed === state.listed) return;
  state.listed = listed;
  const list = $("voices");
  const focused = list.contains(document.activeElement) ? document.activeElement : null;
  const place = focused && {
    voice: focused.closest("li").dataset.voice,
    index: [...focused.closest("li").querySelectorAll("button")].indexOf(focused),
  };
  list.replaceChildren();
  $("voices-empty").textContent = "No stored voices yet.";
  $("voices-empty").hidden = state.voices.length > 0;
  for (const voice of state.voices) {
    const item = document.createElement("li");
    item.dataset.voice = voice.name;
    const about = document.createElement("div");
    about.className = "about";
    const name = document.createElement("strong");
    name.textContent = voice.name;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `${voice.duration.toFixed(1)} s${voice.builtin ? " · made for the OpenAI name" : ""}`;
    const words = document.createElement("span");
    words.className = "words";
    words.textContent = voice.transcript;
    about.append(name, meta, words);
    const buttons = document.createElement("div");
    buttons.className = "buttons";
    buttons.append(
      button("Play", `Play the sample of ${voice.name}`, () => playSample(voice)),
      button("Use", `Use ${voice.name}`, () => {
        useVoice(voice.name);
        $("speak-status").textContent = `The voice is now ${voice.name}.`; // the focus went to the text
      }),
      deleteButton(voice),
    );
    item.append(about, buttons);
    list.append(item);
  }
  if (place) {
    const again = [...list.children].find((item) => item.dataset.voice === place.voice);
    (again?.querySelectorAll("button")[place.index] ?? $("refresh")).focus();
  }
}

function button(text, label, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = text;
  element.setAttribute("aria-label", label);
  element.addEventListener("click", onClick);
  return element;
}

function deleteButton(voice) {
  // Two presses: the first asks, the second deletes (no modal dialog to trap the keyboard). Leaving the
  // button keeps the voice. Both are said in a live region too: a screen reader may not announce that the
  // focused button's name changed.
  const label = `Delete ${voice.name}`;
  const element = button("Delete", label, async (event) => {
    if (element.dataset.armed === "deleting") return;
    // A double click's second click never confirms: it would delete unasked.
    if (event.detail > 1) return;
    if (element.dataset.armed !== "yes") {
      element.dataset.armed = "yes";
      element.textContent = "Confirm delete";
      element.setAttribute("aria-label", `Confirm: delete ${voice.name}`);
      element.classList.add("danger");
      $("library-status").textContent = `Press again to delete ${voice.name}; move on to keep it.`;
      return;
    }
    element.dataset.armed = "deleting";
    clearError();
    try {
      await request(`/v1/audio/voices/${encodeURIComponent(voice.id)}`, { method: "DELETE" });
      const selected = $("voice").value;
      await loadVoices();
      const now = $("voice").value;
      const said =
        selected === voice.name && now !== selected
          ? `Deleted the voice ${voice.name}; the voice is now ${now}.`
          : `Deleted the voice ${voice.name}.`;
      $("speak-status").textContent = said;
      $("library-status").textContent = said; // where "Press again to delete" was said
      updateFormatHint();
      $("refresh").focus();
    } catch (err) {
      disarm(); // pressed again, it asks again
      showError(err, {}, voice.name);
    }
  });
  function disarm() {
    element.dataset.armed = "";
    element.textContent = "Delete";
    element.setAttribute("aria-label", label);
    element.classList.remove("danger");
  }
  element.addEventListener("blur", () => {
    if (element.dataset.armed === "yes") $("library-status").textContent = `Kept ${voice.name}.`;
    disarm();
  });
  return element;
}

async function playSample(voice) {
  clearError();
  try {
    const blob = await (await request(`/v1/audio/voices/${encodeURIComponent(voice.id)}/sample`)).blob();
    const player = $("sample-player");
    player.hidden = false;
    player.src = URL.createObjectURL(blob);
    await player.play();
  } catch (err) {
    showError(err, {}, voice.name);
  }
}

function useVoice(name) {
  const select = $("voice");
  if (![...select.options].some((o) => o.value === name)) select.append(option(name, name));
  select.value = name;
  $("text").focus();
}

$("refresh").addEventListener("click", async () => {
  try {
    await loadVoices();
    const count = state.voices.length;
    $("library-status").textContent = `The library has ${count} voice${count === 1 ? "" : "s"}.`;
  } catch (err) {
    showError(err);
  }
});

// ---- speaking ----

/** The length of `text` as the API counts it: characters (code points) of its composed form (NFC), where an
 * emoji is one, not two UTF-16 units as `maxlength` and `String.length` count them, and a letter typed with
 * its accent apart is one. */
const characters = (text) => [...text.normalize("NFC")].length;

function updateCount() {
  const text = $("text");
  const length = characters(text.value);
  const count = $("count");
  count.textContent = `${length} / ${state.limit}`;
  count.classList.toggle("full", length >= state.limit);
  // A paste over the limit is kept whole (a maxlength would cut it unsaid): Speak says what is too long.
  const over = length - state.limit;
  text.setCustomValidity(
    over > 0 ? `The text has ${length} characters, ${over} more than the ${state.limit} of one request.` : "",
  );
}

function updateFormatHint() {
  const format = $("format").value;
  const cloning = $("voice").value === CLIP;
  $("speed").disabled = cloning; // the chat endpoint that clones once has no speed
  $("format").disabled = cloning; // nor a format: it streams raw audio, downloaded as wav
  showSpeed();
  $("format-hint").textContent = cloning
    ? "Cloning from the clip streams raw audio at normal speed; the download is wav."
    : streamsLive(format)
      ? `${format} plays as it streams.`
      : `${format} plays when it is complete; mp3, wav, aac or pcm play as they stream.`;
}

$("text").addEventListener("input", updateCount);
$("format").addEventListener("change", updateFormatHint);
$("voice").addEventListener("change", updateFormatHint);
$("speed").addEventListener("input", showSpeed);

function showSpeed() {
  const speed = Number($("speed").value).toFixed(2);
  // shown; the slider itself tells a screen reader, with a unit. Off (cloning once), the speed is normal.
  $("speed-out").textContent = $("speed").disabled ? "1.00×" : `${speed}×`;
  $("speed").setAttribute("aria-valuetext", `${speed} times`);
}

function setSpeaking(on) {
  // Keyboard focus follows the one button that can act: Stop while generating, Speak after. Stop stays
  // while the answer still sounds after its stream ended (Web Audio has no controls of its own).
  const hadFocus = document.activeElement === $("speak") || document.activeElement === $("stop");
  setOff($("speak"), on);
  $("stop").hidden = !on && !state.sounding;
  if (hadFocus) $(on || state.sounding ? "stop" : "speak").focus();
}

/** `player` plays on after its stream ended: Stop silences it, and goes when it has played. */
function soundsOn(player) {
  if (!player.sounding) return;
  state.sounding = player;
  player.sounding.then(() => {
    if (state.sounding !== player) return;
    state.sounding = null;
    if (!state.speaking) setSpeaking(false);
  });
}

$("speak-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (state.speaking) return; // a second press (Speak is off, not disabled: see setOff)
  clearError();
  if (!$("text").value.trim()) {
    const blank = new ApiError(0, "Type the text to speak: there are only spaces in it.", "input");
    showError(blank, SPEECH_FIELDS);
    return;
  }
  const cloning = $("voice").value === CLIP;
  const voice = $("voice").value;
  const format = cloning ? "wav" : $("format").value;
  const controller = new AbortController();
  const status = $("speak-status");
  const download = $("download");
  hush();
  // The player is made at the first audio: a refused request leaves the previous answer to play and download.
  let player = null;
  state.speaking = { controller };
  setSpeaking(true);
  status.textContent = "Generating…";
  const started = performance.now();
  let first = null;
  const live = streamsLive(format);
  const onAudio = (bytes) => {
    if (first === null) {
      download.hidden = true;
      player = playerFor(format, $("player"));
      $("player").hidden = false; // hidden until the first answer: empty controls are two Tab stops of nothing
      first = performance.now() - started;
      const after = (first / 1000).toFixed(1);
      status.textContent = live
        ? `Playing while the rest is generated (first audio after ${after} s)…`
        : `Receiving the audio (the first of it after ${after} s); ${format} plays when it is complete…`;
    }
    player.push(bytes);
  };
  try {
    const signal = controller.signal;
    const response = cloning ? await cloneOnce(signal) : await speak(wireFormat(format), signal);
    for await (const message of events(response)) {
      if (message.error) throw new ApiError(500, message.error.message);
      const delta =
        message.type === "speech.audio.delta" ? message.audio : message.choices?.[0]?.delta?.audio?.data;
      if (delta) onAudio(fromBase64(delta));
    }
    if (player === null) throw new ApiError(500, "the service sent no audio");
    const file = await player.end();
    soundsOn(player);
    if (download.href) URL.revokeObjectURL(download.href);
    download.href = URL.createObjectURL(file);
    download.download = `speech.${format}`;
    download.textContent = `Download ${format} (${size(file.size)})`;
    download.hidden = false;
    const total = ((performance.now() - started) / 1000).toFixed(1);
    status.textContent = `Done in ${total} s; first audio after ${(first / 1000).toFixed(1)} s.`;
    // an OpenAI name's first use stores a voice for it
    if (OPENAI_VOICES.includes($("voice").value)) loadVoices().catch(() => {});
  } catch (err) {
    try {
      player?.stop();
    } catch {
      // a player that could not stop cleanly is dropped anyway; the request's error is what matters
    }
    status.textContent = err.name === "AbortError" ? "Stopped." : "";
    showError(err, cloning ? {} : SPEECH_FIELDS, cloning ? null : voice);
  } finally {
    state.speaking = null;
    setSpeaking(false);
  }
});

$("stop").addEventListener("click", () => {
  state.speaking?.controller.abort();
  state.sounding?.silence();
});

function speak(format, signal) {
  const body = {
    model: "tts-1",
    input: $("text").value,
    voice: $("voice").value,
    response_format: format,
    speed: Number($("speed").value),
    stream_format: "sse",
  };
  const instructions = $("instructions").value.trim();
  if (instructions) body.instructions = instructions;
  return request("/v1/audio/speech", { method: "POST", json: body, signal });
}

async function cloneOnce(signal) {
  const messages = [];
  const instructions = $("instructions").value.trim();
  if (instructions) messages.push({ role: "system", content: instructions });
  messages.push({
    role: "user",
    content: [
      { type: "text", text: $("text").value },
      {
        type: "input_audio",
        // the format only when the API knows its name (it reads the bytes either way)
        input_audio: { data: await dataUrl(state.clip), format: clipFormat(state.clip) },
      },
    ],
  });
  const body = {
    model: "gpt-4o-audio-preview",
    modalities: ["text", "audio"],
    audio: { voice: "clone", format: "pcm16" },
    stream: true,
    messages,
  };
  return request("/v1/chat/completions", { method: "POST", json: body, signal });
}

// ---- the reference clip ----

// The `input_audio.format` names the API takes, and other names of the same formats.
const CLIP_FORMATS = ["wav", "mp3", "flac", "ogg", "opus", "webm", "m4a", "mp4", "aac"];
const CLIP_ALIASES = { wave: "wav", "x-wav": "wav", mpeg: "mp3", oga: "ogg", "x-m4a": "m4a", "x-flac": "flac" };

/** The clip's format as the API names it, or undefined (left out: the API tells by the bytes). */
function clipFormat(file) {
  const extension = (file.name.split(".").pop() || "").toLowerCase();
  const subtype = (file.type.split("/")[1] || "").split(";")[0].toLowerCase();
  for (const name of [extension !== file.name.toLowerCase() ? extension : "", subtype]) {
    const known = CLIP_FORMATS.includes(name) ? name : CLIP_ALIASES[name];
    if (known) return known;
  }
  return undefined;
}

/** Why `file` cannot be the clip (the service would refuse it whatever is done with it), or null. */
function clipRefused(file) {
  if (file.size === 0) return `${file.name} is empty.`;
  if (file.size > state.uploadBytes) {
    return `${file.name} is ${size(file.size)}; the service takes files up to ${size(state.uploadBytes)}.`;
  }
  return null;
}

/** Takes `file` as the reference clip, unless the service would refuse it (the clip before stays). */
function setClip(file, origin) {
  const refused = clipRefused(file);
  if (refused) {
    $("clip-file").value = ""; // (not shown as chosen: the clip is still the one before, if any)
    showError(new ApiError(0, refused, "file"), TRANSCRIBE_FIELDS);
    return;
  }
  if (state.invalid === $("clip-file")) clearError(); // what it said was about the clip this one replaces
  state.clip = file;
  const player = $("clip-player");
  if (player.src) URL.revokeObjectURL(player.src);
  player.src = URL.createObjectURL(file);
  player.hidden = false;
  const info = (text) => {
    if (state.clip === file) $("clip-info").textContent = `${origin}: ${file.name}, ${text}`;
  };
  info(`${size(file.size)}.`);
  const said = (seconds) => {
    // A voice takes so much of it at most (the service refuses a longer one); speech recognition all of it.
    const long = seconds > state.referenceSeconds;
    const why = long ? ` A voice takes at most ${state.referenceSeconds} s; it can be transcribed.` : "";
    info(`${seconds.toFixed(1)} s.${why}`);
  };
  // (A clip replaced before it loaded leaves its listeners to the next one's events: `info` ignores them.)
  player.addEventListener(
    "loadedmetadata",
    () => {
      if (Number.isFinite(player.duration)) said(player.duration);
      else clipSeconds(file).then(said, () => {}); // a recording's webm states no length: decode it
    },
    { once: true },
  );
  // A file the browser cannot play (AIFF, or not audio at all) may still be one the service reads.
  const unplayable = "; this browser cannot play it (the service may still read it).";
  player.addEventListener("error", () => info(`${size(file.size)}${unplayable}`), { once: true });
  renderVoiceSelect();
}

async function clipSeconds(file) {
  const context = new AudioContext();
  try {
    return (await context.decodeAudioData(await file.arrayBuffer())).duration;
  } finally {
    context.close();
  }
}

$("clip-file").addEventListener("change", () => {
  const file = $("clip-file").files[0];
  if (file) setClip(file, "Uploaded");
});

$("record").addEventListener("click", async (event) => {
  const record = $("record");
  if (isOff(record) || record.dataset.starting) return; // stopping, or a second click while the mic opens
  if (event.detail > 1) return; // a double click's second click, even where the mic opened in between
  if (state.recording) {
    setOff(record, true);
    const file = await state.recording.stop();
    state.recording = null;
    setOff(record, false);
    $("clip-clock").textContent = "";
    record.textContent = "Record";
    record.classList.remove("recording");
    setClip(file, "Recorded");
    return;
  }
  clearError();
  record.dataset.starting = "yes";
  try {
    state.recording = await startRecording({ maxSeconds: RECORD_SECONDS, onTick: showRecordingTime });
    $("clip-info").textContent = `Recording (at most ${RECORD_SECONDS} s):`;
    record.textContent = "Stop recording";
    record.classList.add("recording");
    state.recording.done.then((file) => {
      if (state.recording) record.click(); // stopped at the time limit
      return file;
    });
  } catch (err) {
    showError(new ApiError(0, `the microphone could not be used: ${err.message}`));
  } finally {
    delete record.dataset.starting;
  }
});

// The counter ticks outside the live region (a screen reader would talk over the speaker every second, and
// be recorded); the live region says when the recording starts, when 5 s are left, and what it gave.
function showRecordingTime(seconds) {
  const shown = `${seconds.toFixed(0)} s`;
  if ($("clip-clock").textContent !== shown) $("clip-clock").textContent = shown;
  const warning = "Recording (5 s left):";
  if (RECORD_SECONDS - seconds <= 5 && $("clip-info").textContent !== warning) {
    $("clip-info").textContent = warning;
  }
}

if (!canRecord()) {
  // Off but still focusable, with the reason shown beside it: a disabled button and its tooltip are out of
  // the keyboard's reach.
  setOff($("record"), true);
  $("record-why").textContent = "This browser cannot record here: recording needs HTTPS or localhost.";
  $("record-why").hidden = false;
  $("record").setAttribute("aria-describedby", "record-why clip-hint");
}

function needClip() {
  if (state.clip) return true;
  showError(new ApiError(0, "upload or record a reference clip first"));
  $("clip-file").focus({ preventScroll: true }); // the message above stays in view
  return false;
}

$("store-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const store = $("store");
  if (isOff(store)) return; // storing already (Enter in a field submits too)
  clearError();
  const name = $("voice-name").value.trim();
  if (!name) {
    // (a name of spaces passes `required`: the page says what is missing, as for the text to speak)
    const blank = new ApiError(0, "Type a name for the voice: there are only spaces in it.", "name");
    showError(blank, STORE_FIELDS);
    return;
  }
  if (!needClip()) return;
  const form = new FormData();
  form.append("name", name);
  form.append("audio_sample", state.clip, state.clip.name);
  const transcript = $("voice-transcript").value.trim();
  if (transcript) form.append("transcript", transcript);
  setOff(store, true);
  store.textContent = "Storing…";
  try {
    await request("/v1/audio/voices", { method: "POST", form });
    await loadVoices();
    useVoice(name);
    $("speak-status").textContent = `Stored the voice ${name}; it is selected above.`;
    // (the clip stays: it may be cloned once or transcribed next)
    for (const id of ["voice-name", "voice-transcript"]) $(id).value = "";
    $("consent").checked = false;
    $("speak-status").scrollIntoView({ block: "nearest" }); // on a phone the Speak card is far above
  } catch (err) {
    showError(err, STORE_FIELDS, name);
  } finally {
    setOff(store, false);
    store.textContent = "Store voice";
  }
});

$("transcribe").addEventListener("click", async () => {
  const transcribe = $("transcribe");
  if (isOff(transcribe)) return;
  clearError();
  if (!needClip()) return;
  const form = new FormData();
  form.append("file", state.clip, state.clip.name);
  form.append("model", "whisper-1");
  const output = $("transcript");
  setOff(transcribe, true);
  output.textContent = "Transcribing…";
  try {
    const { text } = await (await request("/v1/audio/transcriptions", { method: "POST", form })).json();
    output.textContent = text.trim() || "(no words recognised)";
  } catch (err) {
    output.textContent = "";
    showError(err, TRANSCRIBE_FIELDS);
  } finally {
    setOff(transcribe, false);
  }
});

// ---- start ----

renderVoiceSelect();
updateCount();
updateFormatHint();
watchReadiness();
load();
