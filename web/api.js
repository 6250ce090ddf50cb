// Calls to the service's OpenAI-shaped API: the key, the error envelope, and server-sent events.

const KEY_ITEM = "higgs-api-key";

/** An answer that was not 2xx; `message` is the API's own message from its error envelope. */
export class ApiError extends Error {
  constructor(status, message, param = null, code = null) {
    super(message);
    this.status = status;
    this.param = param;
    this.code = code;
  }
}

/** The service did not answer, or the connection broke before the answer was complete. */
export class Unreachable extends ApiError {
  constructor(message) {
    super(0, message);
  }
}

export const apiKey = {
  get: () => sessionStorage.getItem(KEY_ITEM) || "",
  set: (key) => (key ? sessionStorage.setItem(KEY_ITEM, key) : sessionStorage.removeItem(KEY_ITEM)),
};

/** fetch() with the tab's API key; throws ApiError with the server's message on a non-2xx answer. */
export async function request(path, { method = "GET", json, form, signal } = {}) {
  const headers = {};
  const key = apiKey.get();
  if (key) headers.Authorization = `Bearer ${key}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new Unreachable("the service could not be reached; is it running?");
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  const text = await response.text();
  try {
    const { error } = JSON.parse(text);
    if (error && error.message) return new ApiError(response.status, error.message, error.param, error.code);
  } catch {
    // not the JSON envelope (a proxy's page, say): show the status and the start of the text
  }
  return new ApiError(response.status, `${response.status} ${response.statusText}: ${text.slice(0, 200)}`);
}

/** Yields the parsed `data:` payload of each server-sent event of a streamed response ("[DONE]" as is). */
export async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (err) {
        if (err.name === "AbortError") throw err;
        throw new Unreachable("the connection to the service broke before the answer was complete");
      }
      const { value, done } = chunk;
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (data) yield data === "[DONE]" ? data : JSON.parse(data);
      }
    }
  } finally {
    reader.releaseLock();
  }
}

/** Base64 text to bytes. */
export function fromBase64(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

/** A Blob as a `data:...;base64,` URL (the API accepts the prefix on input_audio). */
export function dataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}
