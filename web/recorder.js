// Recording a clip from the microphone with MediaRecorder (webm/opus, which the service decodes).

const TYPE = "audio/webm;codecs=opus";

export function canRecord() {
  return Boolean(navigator.mediaDevices?.getUserMedia && window.MediaRecorder);
}

/** Starts recording; returns { stop(): Promise<File> }. Stops by itself after `maxSeconds`. */
export async function startRecording({ maxSeconds = 30, onTick = () => {} } = {}) {
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  const recorder = new MediaRecorder(stream, MediaRecorder.isTypeSupported(TYPE) ? { mimeType: TYPE } : {});
  const chunks = [];
  recorder.ondataavailable = (event) => event.data.size && chunks.push(event.data);
  const started = performance.now();
  const timer = setInterval(() => {
    const seconds = (performance.now() - started) / 1000;
    onTick(seconds);
    if (seconds >= maxSeconds) finish();
  }, 250);
  const done = new Promise((resolve) => {
    recorder.onstop = () => {
      clearInterval(timer);
      stream.getTracks().forEach((track) => track.stop());
      const type = recorder.mimeType || "audio/webm";
      resolve(new File(chunks, "recording.webm", { type }));
    };
  });
  function finish() {
    if (recorder.state !== "inactive") recorder.stop();
    return done;
  }
  recorder.start(250);
  return { stop: finish, done };
}
