// Players that start sounding with the first piece of a stream, and keep the whole file for download.
//
// mp3 and aac (ADTS) go through Media Source Extensions into the page's <audio> element, so the element
// itself plays while the rest is generated. Raw PCM (also used for wav, and for the chat endpoint's
// pcm16 clone stream) is scheduled on the Web Audio API as it arrives; when it ends the <audio> element
// gets the WAV to replay. Ogg/Opus and FLAC cannot be appended piecewise in Chromium: they play when done.

export const SAMPLE_RATE = 24000;
const MSE_TYPES = { mp3: "audio/mpeg", aac: "audio/aac" };
const FILE_TYPES = {
  mp3: "audio/mpeg",
  aac: "audio/aac",
  opus: "audio/ogg",
  flac: "audio/flac",
  wav: "audio/wav",
  pcm: "audio/pcm",
};

/** Whether `format` can be heard while it streams in this browser. */
export function streamsLive(format) {
  if (format === "pcm" || format === "wav") return typeof AudioContext !== "undefined";
  const type = MSE_TYPES[format];
  return Boolean(type && window.MediaSource && MediaSource.isTypeSupported(type));
}

/** The format to ask the API for when the user wants `format` (wav is built here from the PCM stream). */
export function wireFormat(format) {
  return format === "wav" ? "pcm" : format;
}

/** A player for a stream of `format` bytes that ends in `audio` (an HTMLAudioElement). */
export function playerFor(format, audio) {
  if (format === "pcm" || format === "wav") return new PcmPlayer(audio, format);
  if (streamsLive(format)) return new MsePlayer(audio, format);
  return new WholePlayer(audio, format);
}

class Player {
  constructor(audio, format) {
    this.audio = audio;
    this.format = format;
    this.chunks = [];
    this.bytes = 0;
    audio.pause();
    audio.removeAttribute("src");
    audio.load(); // the controls forget the previous answer (its length, its position) at once
    audio.dataset.state = "streaming";
  }

  push(bytes) {
    this.chunks.push(bytes);
    this.bytes += bytes.length;
  }

  /** The finished file, for download. */
  file() {
    return new Blob(this.chunks, { type: FILE_TYPES[this.format] });
  }

  /** Called once the stream ended; returns the finished file. */
  async end() {
    this.audio.dataset.state = "done";
    return this.file();
  }

  stop() {
    this.audio.dataset.state = "stopped";
    this.audio.pause();
  }
}

class MsePlayer extends Player {
  constructor(audio, format) {
    super(audio, format);
    this.queue = [];
    this.ending = false;
    this.source = new MediaSource();
    this.opened = new Promise((resolve) => {
      this.source.addEventListener(
        "sourceopen",
        () => {
          if (this.stopped) return resolve(); // refused or stopped before the source opened
          this.buffer = this.source.addSourceBuffer(MSE_TYPES[format]);
          this.buffer.addEventListener("updateend", () => this.pump());
          this.pump();
          resolve();
        },
        { once: true },
      );
    });
    audio.src = URL.createObjectURL(this.source);
  }

  push(bytes) {
    super.push(bytes);
    this.queue.push(bytes);
    this.pump();
    if (!this.started) {
      this.started = true;
      this.audio.play().catch(() => {}); // a refused autoplay leaves the controls to the user
    }
  }

  pump() {
    if (!this.buffer || this.buffer.updating || this.source.readyState !== "open") return;
    if (this.queue.length) {
      this.buffer.appendBuffer(this.queue.shift());
    } else if (this.ending) {
      this.source.endOfStream();
    }
  }

  async end() {
    await this.opened;
    this.ending = true;
    this.pump();
    return super.end();
  }

  stop() {
    super.stop();
    this.stopped = true;
    this.queue = [];
    if (this.buffer && !this.buffer.updating && this.source.readyState === "open") this.source.endOfStream();
  }
}

class PcmPlayer extends Player {
  constructor(audio, format) {
    super(audio, format);
    // Made inside the click's task, so that the browser lets it sound.
    this.context = new AudioContext({ sampleRate: SAMPLE_RATE });
    this.next = 0;
    this.carry = null;
    this.samples = 0;
  }

  push(bytes) {
    super.push(bytes);
    let data = bytes;
    if (this.carry !== null) {
      data = new Uint8Array(bytes.length + 1);
      data[0] = this.carry;
      data.set(bytes, 1);
      this.carry = null;
    }
    if (data.length % 2) {
      this.carry = data[data.length - 1];
      data = data.subarray(0, data.length - 1);
    }
    const count = data.length / 2;
    if (!count) return;
    const view = new DataView(data.buffer, data.byteOffset, data.length);
    const buffer = this.context.createBuffer(1, count, SAMPLE_RATE);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < count; i++) channel[i] = view.getInt16(2 * i, true) / 32768;
    const node = this.context.createBufferSource();
    node.buffer = buffer;
    node.connect(this.context.destination);
    // A tenth of a second of slack at the start, so that pieces arriving a little late still join up.
    const now = this.context.currentTime;
    if (this.next < now) this.next = now + (this.samples ? 0.02 : 0.1);
    node.start(this.next);
    this.next += buffer.duration;
    this.samples += count;
  }

  file() {
    const pcm = new Blob(this.chunks);
    return this.format === "pcm" ? new Blob([pcm], { type: FILE_TYPES.pcm }) : wav(pcm, this.bytes);
  }

  async end() {
    const file = await super.end();
    // The same audio, for replay and seeking, in the page's <audio> element (not played again now).
    const playable = this.format === "pcm" ? wav(new Blob(this.chunks), this.bytes) : file;
    this.audio.src = URL.createObjectURL(playable);
    // What was scheduled plays on after the stream's end (on a GPU most of a long answer): `sounding`
    // settles when it has played, or when `silence()` cut it short.
    const left = Math.max(0, this.next - this.context.currentTime);
    this.sounding = new Promise((resolve) => {
      this.settle = resolve;
      this.timer = setTimeout(() => this.silence(), left * 1000 + 200);
    });
    return file;
  }

  /** Stops what is still scheduled to sound (the stream's end has been reached or not). */
  silence() {
    clearTimeout(this.timer);
    this.context.close().catch(() => {});
    this.settle?.();
  }

  stop() {
    super.stop();
    this.silence();
  }
}

class WholePlayer extends Player {
  async end() {
    const file = await super.end();
    this.audio.src = URL.createObjectURL(file);
    this.audio.play().catch(() => {});
    return file;
  }
}

/** A WAV file around 16-bit mono PCM at 24 kHz. */
export function wav(pcm, length) {
  const header = new DataView(new ArrayBuffer(44));
  const text = (offset, s) => [...s].forEach((c, i) => header.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF");
  header.setUint32(4, 36 + length, true);
  text(8, "WAVE");
  text(12, "fmt ");
  header.setUint32(16, 16, true);
  header.setUint16(20, 1, true); // PCM
  header.setUint16(22, 1, true); // mono
  header.setUint32(24, SAMPLE_RATE, true);
  header.setUint32(28, SAMPLE_RATE * 2, true);
  header.setUint16(32, 2, true);
  header.setUint16(34, 16, true);
  text(36, "data");
  header.setUint32(40, length, true);
  return new Blob([header, pcm], { type: FILE_TYPES.wav });
}
