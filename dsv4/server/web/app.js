// The chat page's behaviour: keeps the conversation, streams replies from /v1/chat/completions
// (fetch + server-sent events), shows reasoning folded, stops a reply (AbortController), starts new
// chats, and shows tokens/s measured from the stream. It knows the OpenAI chunk shape, not the model.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const md = window.dsv4Markdown;
  const chat = { history: [], model: null, controller: null };
  const saved = ["thinking", "max-tokens", "temperature", "api-key", "system"];

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  async function loadModel() {
    try {
      const res = await fetch("/v1/models", { headers: headers() });
      const body = await res.json();
      if (!res.ok) throw new Error(body.error ? body.error.message : res.statusText);
      chat.model = body.data[0].id;
      $("model").textContent = chat.model;
    } catch (e) {
      $("model").textContent = "not connected: " + e.message;
    }
  }

  // Yields the data field of each server-sent event.
  async function* sseData(stream) {
    const reader = stream.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let k;
        while ((k = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, k);
          buf = buf.slice(k + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
          if (data) yield data;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  function addUser(text) {
    const el = document.createElement("div");
    el.className = "msg user";
    el.textContent = text;
    $("messages").appendChild(el);
    return el;
  }

  // An assistant bubble that re-renders (at most once a frame) as text arrives.
  function addAssistant() {
    const el = document.createElement("div");
    el.className = "msg assistant";
    el.innerHTML = '<details class="reasoning" hidden><summary>Thinking…</summary><div class="md"></div></details>' +
      '<div class="content md"></div><div class="note"></div>';
    $("messages").appendChild(el);
    const view = { el, reasoning: "", content: "", pending: false };
    view.render = () => {
      view.pending = false;
      const details = el.querySelector("details.reasoning");
      if (view.reasoning) {
        details.hidden = false;
        details.querySelector("summary").textContent = view.done ? "Reasoning" : "Thinking…";
        details.querySelector(".md").innerHTML = md.render(view.reasoning);
      }
      el.querySelector(".content").innerHTML = md.render(view.content);
      const box = $("messages");
      box.scrollTop = box.scrollHeight;
    };
    view.update = () => {
      if (!view.pending) {
        view.pending = true;
        requestAnimationFrame(view.render);
      }
    };
    view.note = (text) => { el.querySelector(".note").textContent = text; };
    return view;
  }

  function requestBody() {
    const system = $("system").value.trim();
    const messages = (system ? [{ role: "system", content: system }] : []).concat(chat.history);
    const body = {
      model: chat.model, messages, stream: true, stream_options: { include_usage: true },
      thinking: { type: $("thinking").checked ? "enabled" : "disabled" },
    };
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
    return body;
  }

  function showSpeed(tokens, first, last) {
    if (tokens > 1 && last > first) $("speed").textContent = ((tokens - 1) / ((last - first) / 1000)).toFixed(1) + " tok/s";
  }

  // Reads one streamed reply into `view`; returns the finish reason.
  async function readReply(res, view) {
    let tokens = 0, first = 0, last = 0, finish = null;
    for await (const data of sseData(res.body)) {
      if (data === "[DONE]") break;
      const msg = JSON.parse(data);
      if (msg.error) throw new Error(msg.error.message);
      if (msg.usage && msg.usage.completion_tokens) tokens = msg.usage.completion_tokens;
      for (const choice of msg.choices || []) {
        const d = choice.delta || {};
        if (d.reasoning_content || d.content) {
          view.reasoning += d.reasoning_content || "";
          view.content += d.content || "";
          last = performance.now();
          if (!first) first = last;
          tokens++;
        }
        for (const call of d.tool_calls || []) {
          view.content += "\n\n```\n" + call.function.name + "(" + call.function.arguments + ")\n```\n";
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      view.update();
      showSpeed(tokens, first, last);
    }
    return finish;
  }

  async function send(text) {
    if (chat.controller || !text.trim()) return;
    if (!chat.model) await loadModel();
    const history = chat.history; // a new chat replaces it; this reply stays with its own
    history.push({ role: "user", content: text });
    addUser(text);
    const view = addAssistant();
    const controller = new AbortController();
    chat.controller = controller;
    setBusy(true);
    try {
      const res = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
      });
      if (!res.ok) {
        const err = await res.json().catch(() => null);
        throw new Error(err && err.error ? err.error.message : res.status + " " + res.statusText);
      }
      const finish = await readReply(res, view);
      view.note(finish === "length" ? "[cut at max tokens]" : "");
    } catch (e) {
      if (e.name === "AbortError") view.note("[stopped]");
      else (view.el.classList.add("error"), view.note("error: " + e.message));
    } finally {
      view.done = true;
      view.render();
      if (chat.controller === controller) {
        chat.controller = null;
        setBusy(false);
      }
      view.el.dataset.done = "1";
    }
    history.push({ role: "assistant", content: view.content });
  }

  function setBusy(busy) {
    $("stop").hidden = !busy;
    $("send").disabled = busy;
  }

  function newChat() {
    if (chat.controller) chat.controller.abort();
    chat.controller = null;
    setBusy(false);
    chat.history = [];
    $("messages").innerHTML = "";
    $("speed").textContent = "– tok/s";
    $("input").focus();
  }

  function bind() {
    for (const id of saved) {
      const el = $(id), key = "dsv4." + id, value = localStorage.getItem(key);
      if (value !== null) el.type === "checkbox" ? (el.checked = value === "1") : (el.value = value);
      el.addEventListener("change", () => localStorage.setItem(key, el.type === "checkbox" ? (el.checked ? "1" : "0") : el.value));
    }
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = $("input").value;
      $("input").value = "";
      send(text);
    });
    $("input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop").addEventListener("click", () => chat.controller && chat.controller.abort());
    $("new-chat").addEventListener("click", newChat);
    $("api-key").addEventListener("change", loadModel);
  }

  bind();
  loadModel();
})();
