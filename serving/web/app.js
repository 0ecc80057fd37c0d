// qwen-serve web chat: a dependency-free client of the same-origin OpenAI API.
//
// Why it looks like this:
// * No build step and no CDN: the page must work on an offline machine, served as
//   static files by the ingress (index.html at "/", this file at "/static/app.js").
// * Streaming uses fetch + ReadableStream (not EventSource) because the chat endpoint
//   is a POST with a JSON body; an AbortController backs the Stop button, and closing
//   the connection is what makes the server stop generating.
// * Model output is only ever written with textContent: no HTML or script in a reply
//   can run (the page's Content-Security-Policy is a second, independent guard).
"use strict";

(() => {
  const API_KEY_STORAGE = "qwen-serve.api-key";
  // A stream that sends nothing for this long is treated as dead, so the page never
  // hangs silently on a half-open connection.
  const STALL_TIMEOUT_MS = 180000;

  const $ = (id) => document.getElementById(id);
  const el = {
    model: $("model"),
    newChat: $("new-chat"),
    systemPrompt: $("system-prompt"),
    maxTokens: $("max-tokens"),
    temperature: $("temperature"),
    temperatureValue: $("temperature-value"),
    topP: $("top-p"),
    topPValue: $("top-p-value"),
    jsonMode: $("json-mode"),
    apiKey: $("api-key"),
    messages: $("messages"),
    emptyHint: $("empty-hint"),
    error: $("error"),
    composer: $("composer"),
    prompt: $("prompt"),
    send: $("send"),
    stop: $("stop"),
    status: $("status"),
    settingsForm: $("settings-form"),
  };

  /** Conversation so far, exactly as sent to the API (system prompt excluded). */
  let history = [];
  /** The in-flight generation, or null. */
  let current = null;

  // ---------------------------------------------------------------- settings

  function showSliderValues() {
    el.temperatureValue.textContent = Number(el.temperature.value).toFixed(2);
    el.topPValue.textContent = Number(el.topP.value).toFixed(2);
  }

  function authHeaders() {
    const key = el.apiKey.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function samplingParams() {
    const params = {
      temperature: Number(el.temperature.value),
      top_p: Number(el.topP.value),
    };
    const maxTokens = parseInt(el.maxTokens.value, 10);
    if (Number.isFinite(maxTokens) && maxTokens > 0) params.max_tokens = maxTokens;
    return params;
  }

  // ---------------------------------------------------------------- errors

  function showError(text) {
    el.error.textContent = text;
    el.error.hidden = false;
  }

  function clearError() {
    el.error.textContent = "";
    el.error.hidden = true;
  }

  /** Pulls the OpenAI-style `{"error": {"message": ...}}` text out of a body. */
  function errorMessageFrom(bodyText) {
    try {
      const body = JSON.parse(bodyText);
      if (body && typeof body.error === "object" && body.error && body.error.message) {
        return String(body.error.message);
      }
      if (body && typeof body.error === "string") return body.error;
      if (body && body.message) return String(body.message);
      if (body && body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (_) {
      /* not JSON: fall through to the raw text */
    }
    return bodyText.trim().slice(0, 500);
  }

  /** Turns a non-2xx response into the sentence the user sees. */
  async function describeHttpError(response) {
    let detail = "";
    try {
      detail = errorMessageFrom(await response.text());
    } catch (_) {
      /* body unreadable: status alone must do */
    }
    const suffix = detail ? ` Server said: ${detail}` : "";
    const status = response.status;
    if (status === 401 || status === 403) {
      return `Not authorized (${status}): this server needs a valid API key. ` +
        `Enter it in the "API key" field under Settings and send again.${suffix}`;
    }
    if (status === 429) {
      const retry = response.headers.get("Retry-After");
      const when = retry ? ` Retry after ${retry} s.` : " Please wait a moment and retry.";
      return `Too many requests (429): the server is busy or you hit a rate limit.${when}${suffix}`;
    }
    if (status >= 500) {
      return `Server error (${status}).${suffix || " No details were given."}`;
    }
    return `Request rejected (${status}).${suffix || " No details were given."}`;
  }

  // ---------------------------------------------------------------- models

  async function loadModels() {
    const previous = el.model.value;
    try {
      const response = await fetch("v1/models", { headers: authHeaders() });
      if (!response.ok) {
        showError(`Could not list models: ${await describeHttpError(response)}`);
        return;
      }
      const body = await response.json();
      const models = Array.isArray(body.data) ? body.data : [];
      el.model.replaceChildren();
      for (const m of models) {
        const option = document.createElement("option");
        option.value = String(m.id);
        // vLLM lists a LoRA adapter with its base model as "parent".
        option.textContent = m.parent && m.parent !== m.id ? `${m.id} (adapter of ${m.parent})` : String(m.id);
        el.model.append(option);
      }
      if (models.length === 0) {
        const option = document.createElement("option");
        option.value = "";
        option.textContent = "(no models)";
        el.model.append(option);
      } else if (models.some((m) => String(m.id) === previous)) {
        el.model.value = previous;
      }
      const chosen = models.find((m) => String(m.id) === el.model.value);
      if (chosen && Number.isFinite(chosen.max_model_len)) {
        el.maxTokens.max = String(chosen.max_model_len);
      }
      if (el.error.textContent.startsWith("Could not list models")) clearError();
    } catch (err) {
      showError(`Could not reach the server to list models (${err.message || err}).`);
    }
  }

  // ---------------------------------------------------------------- rendering

  function addMessage(role, text) {
    el.emptyHint.hidden = true;
    const item = document.createElement("article");
    item.className = `msg ${role}`;
    const who = document.createElement("h2");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const body = document.createElement("div");
    body.className = "content";
    body.textContent = text; // text only, never HTML
    const meta = document.createElement("p");
    meta.className = "meta";
    item.append(who, body, meta);
    el.messages.append(item);
    scrollToEnd();
    return { item, body, meta };
  }

  function scrollToEnd() {
    el.messages.scrollTop = el.messages.scrollHeight;
  }

  function formatStats(s) {
    const parts = [];
    if (s.ttftMs != null) parts.push(`TTFT ${Math.round(s.ttftMs)} ms`);
    if (s.tokensPerSecond != null) parts.push(`${s.tokensPerSecond.toFixed(1)} tok/s`);
    parts.push(`finish: ${s.finishReason || "unknown"}`);
    if (s.usage) {
      parts.push(`tokens: ${s.usage.prompt_tokens} prompt + ${s.usage.completion_tokens} completion = ${s.usage.total_tokens}`);
    }
    return parts.join(" · ");
  }

  function setBusy(busy) {
    el.send.disabled = busy;
    el.stop.disabled = !busy;
    el.status.textContent = busy ? "Generating…" : "";
    el.messages.setAttribute("aria-busy", busy ? "true" : "false");
  }

  // ---------------------------------------------------------------- streaming

  /**
   * Reads an SSE body and calls onData for each `data:` payload.
   * Returns when the stream ends or "[DONE]" arrives.
   */
  async function readSse(response, onData, onActivity) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      onActivity();
      buffer += decoder.decode(value, { stream: true });
      let boundary;
      while ((boundary = buffer.search(/\r?\n\r?\n/)) !== -1) {
        const rawEvent = buffer.slice(0, boundary);
        buffer = buffer.slice(boundary).replace(/^\r?\n\r?\n/, "");
        const data = rawEvent
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") {
          reader.cancel().catch(() => {});
          return true;
        }
        onData(data);
      }
    }
    return false;
  }

  async function send(text) {
    clearError();
    const userTurn = { role: "user", content: text };
    history.push(userTurn);
    const userView = addMessage("user", text);
    const reply = addMessage("assistant", "");
    reply.item.classList.add("streaming");
    reply.meta.textContent = "waiting for first token…";

    const messages = [];
    const system = el.systemPrompt.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...history);

    const payload = {
      messages,
      stream: true,
      stream_options: { include_usage: true },
      ...samplingParams(),
    };
    if (el.model.value) payload.model = el.model.value;
    if (el.jsonMode.checked) payload.response_format = { type: "json_object" };

    const controller = new AbortController();
    let stallTimer = null;
    let stalled = false;
    const armStallTimer = () => {
      clearTimeout(stallTimer);
      stallTimer = setTimeout(() => {
        stalled = true;
        controller.abort();
      }, STALL_TIMEOUT_MS);
    };
    current = { controller, stoppedByUser: false };
    setBusy(true);

    const stats = { ttftMs: null, tokensPerSecond: null, finishReason: null, usage: null };
    const started = performance.now();
    let firstTokenAt = null;
    let chunks = 0;
    let content = "";
    let streamError = null;
    let gotDone = false;

    try {
      armStallTimer();
      const response = await fetch("v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
        body: JSON.stringify(payload),
        signal: controller.signal,
      });
      if (!response.ok) {
        streamError = await describeHttpError(response);
      } else {
        gotDone = await readSse(response, (data) => {
          let chunk;
          try {
            chunk = JSON.parse(data);
          } catch (_) {
            return; // ignore keep-alives or non-JSON comments
          }
          if (chunk.error) {
            streamError = `The server reported an error mid-reply: ${chunk.error.message || JSON.stringify(chunk.error)}`;
            return;
          }
          if (chunk.usage) stats.usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            const delta = (choice.delta && choice.delta.content) || "";
            if (delta) {
              if (firstTokenAt === null) {
                firstTokenAt = performance.now();
                stats.ttftMs = firstTokenAt - started;
              }
              chunks += 1;
              content += delta;
              reply.body.textContent = content; // text only, never HTML
              reply.meta.textContent = `streaming… TTFT ${Math.round(stats.ttftMs)} ms`;
              scrollToEnd();
            }
            if (choice.finish_reason) stats.finishReason = choice.finish_reason;
          }
        }, armStallTimer);
        if (!gotDone && !stats.finishReason && !streamError) {
          streamError = "The connection closed before the reply finished.";
        }
      }
    } catch (err) {
      if (current && current.stoppedByUser) {
        stats.finishReason = "stopped by user";
      } else if (stalled) {
        streamError = `No data from the server for ${STALL_TIMEOUT_MS / 1000} s; gave up.`;
      } else {
        streamError = `Connection to the server failed or dropped (${err.message || err}). ` +
          "Check that the server is running and send again.";
      }
    } finally {
      clearTimeout(stallTimer);
    }

    const ended = performance.now();
    if (firstTokenAt !== null) {
      const generated = stats.usage ? stats.usage.completion_tokens : chunks;
      const seconds = (ended - firstTokenAt) / 1000;
      // The first token is covered by TTFT; the rate is over the decode phase.
      if (generated > 1 && seconds > 0) stats.tokensPerSecond = (generated - 1) / seconds;
    }

    reply.item.classList.remove("streaming");
    if (content) {
      history.push({ role: "assistant", content });
      if (streamError) {
        reply.item.classList.add("failed");
        stats.finishReason = stats.finishReason || "interrupted";
      }
      reply.meta.textContent = formatStats(stats);
    } else {
      history.pop();
      reply.item.remove();
      if (streamError || stats.finishReason === "stopped by user") {
        // Nothing came back: drop the turn (the history must match what is shown) and
        // give the text back for a retry.
        userView.item.remove();
        if (!el.prompt.value) el.prompt.value = text;
        if (!streamError) showError("Stopped before any reply; your message is back in the input box.");
      } else {
        userView.meta.textContent = `empty reply · ${formatStats(stats)}`;
        history.push(userTurn, { role: "assistant", content: "" });
      }
    }
    if (streamError) showError(streamError);
    if (el.messages.querySelector(".msg") === null) el.emptyHint.hidden = false;
    current = null;
    setBusy(false);
    el.prompt.focus();
  }

  // ---------------------------------------------------------------- actions

  function stop() {
    if (current) {
      current.stoppedByUser = true;
      current.controller.abort();
    }
  }

  function newChat() {
    stop();
    history = [];
    for (const node of el.messages.querySelectorAll(".msg")) node.remove();
    el.emptyHint.hidden = false;
    clearError();
    el.prompt.focus();
  }

  function submitPrompt() {
    const text = el.prompt.value.trim();
    if (!text || current) return;
    el.prompt.value = "";
    send(text);
  }

  // ---------------------------------------------------------------- wiring

  el.settingsForm.addEventListener("submit", (e) => e.preventDefault());
  el.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    submitPrompt();
  });
  el.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submitPrompt();
    }
  });
  el.stop.addEventListener("click", stop);
  el.newChat.addEventListener("click", newChat);
  el.temperature.addEventListener("input", showSliderValues);
  el.topP.addEventListener("input", showSliderValues);
  el.apiKey.addEventListener("change", () => {
    const key = el.apiKey.value.trim();
    if (key) sessionStorage.setItem(API_KEY_STORAGE, key);
    else sessionStorage.removeItem(API_KEY_STORAGE);
    loadModels();
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && current) stop();
  });

  // On a phone the settings start folded so the conversation gets the screen.
  if (window.matchMedia("(max-width: 760px)").matches) $("settings").open = false;
  el.apiKey.value = sessionStorage.getItem(API_KEY_STORAGE) || "";
  showSliderValues();
  setBusy(false);
  loadModels();
})();
