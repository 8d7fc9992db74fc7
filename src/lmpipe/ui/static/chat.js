// Chat with any checkpoint: settings, a multi-turn conversation, replies streamed as they
// are generated, a stop button.
import { getJSON, postEvents } from "./api.js";
import { h } from "./dom.js";

function numberInput(name, value, attrs = {}) {
  return h("input", { type: "number", name, value: value ?? "", ...attrs });
}

function numberOrNull(input) {
  return input.value.trim() === "" ? null : Number(input.value);
}

export async function render(root, params) {
  const [defaults, { checkpoints }] = await Promise.all([getJSON("/api/chat/defaults"), getJSON("/api/checkpoints")]);
  const picker = h("select", { name: "checkpoint" });
  const groups = new Map();
  for (const c of checkpoints) {
    if (!groups.has(c.run)) groups.set(c.run, h("optgroup", { label: `${c.run} (${[c.stage, c.arch].filter(Boolean).join(", ")})` }));
    groups.get(c.run).append(h("option", { value: JSON.stringify([c.run, c.name]) }, `${c.run} @ ${c.step}`));
  }
  picker.append(...groups.values());
  // The checkpoint asked for, else the run's newest (listed first), else the newest of all.
  const wanted = checkpoints.find((c) => c.run === params.run && (!params.checkpoint || c.name === params.checkpoint));
  if (wanted) picker.value = JSON.stringify([wanted.run, wanted.name]);
  const mode = h("select", { name: "mode" }, h("option", { value: "chat" }, "chat (template)"), h("option", { value: "text" }, "text (continue)"));
  const system = h("textarea", { name: "system", rows: 3, placeholder: "optional system prompt" }, defaults.system ?? "");
  const temperature = numberInput("temperature", defaults.temperature, { step: "0.05", min: "0" });
  const topK = numberInput("top_k", defaults.top_k, { step: "1", min: "1" });
  const topP = numberInput("top_p", defaults.top_p, { step: "0.05", min: "0", max: "1" });
  const maxTokens = numberInput("max_new_tokens", defaults.max_new_tokens, { step: "1", min: "1" });
  const seed = numberInput("seed", defaults.seed, { step: "1" });
  const log = h("div", { class: "messages", id: "messages" });
  const input = h("textarea", { name: "message", rows: 2, placeholder: "Message (Enter sends, Shift+Enter: new line)" });
  const send = h("button", { type: "submit", id: "send" }, "Send");
  const stop = h("button", { type: "button", id: "stop", disabled: true }, "Stop");
  const reset = h("button", { type: "button" }, "New conversation");
  let messages = [];
  let controller = null;

  const field = (text, node) => h("label", { class: "field" }, h("span", {}, text), node);
  root.append(
    h("h1", {}, "Chat"),
    h(
      "div",
      { class: "chat" },
      h(
        "aside",
        {},
        field("checkpoint", picker),
        field("mode", mode),
        field("system prompt", system),
        field("temperature (0: greedy)", temperature),
        field("top-k (empty: off)", topK),
        field("top-p (empty: off)", topP),
        field("max new tokens", maxTokens),
        field("seed", seed),
        reset,
      ),
      h("section", {}, log, h("form", { class: "composer", onsubmit: (e) => (e.preventDefault(), talk()) }, input, send, stop)),
    ),
  );
  if (!checkpoints.length) log.append(h("p", { class: "muted" }, "no checkpoints under out_dir yet"));

  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      talk();
    }
  });
  stop.addEventListener("click", () => controller?.abort());
  reset.addEventListener("click", () => {
    controller?.abort();
    messages = [];
    log.replaceChildren();
  });

  function bubble(role, text) {
    const node = h("div", { class: `message ${role}`, dataset: { role } }, h("div", { class: "who" }, role), h("div", { class: "text" }, text));
    log.append(node);
    log.scrollTop = log.scrollHeight;
    return node;
  }

  async function talk() {
    const content = input.value.trim();
    if (!content || controller || !picker.value) return;
    const [run, checkpoint] = JSON.parse(picker.value);
    input.value = "";
    if (mode.value === "text") messages = [];
    messages.push({ role: "user", content });
    bubble("user", content);
    const reply = bubble("assistant", "");
    const text = reply.querySelector(".text");
    const info = h("div", { class: "meta" });
    reply.append(info);
    reply.dataset.state = "streaming";
    reply.dataset.pieces = "0";
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    const prefix = system.value.trim() && mode.value === "chat" ? [{ role: "system", content: system.value.trim() }] : [];
    const body = {
      run,
      checkpoint,
      mode: mode.value,
      messages: [...prefix, ...messages],
      temperature: numberOrNull(temperature) ?? defaults.temperature,
      top_k: numberOrNull(topK),
      top_p: numberOrNull(topP),
      max_new_tokens: numberOrNull(maxTokens) ?? defaults.max_new_tokens,
      seed: numberOrNull(seed) ?? defaults.seed,
    };
    try {
      await postEvents(
        "/api/chat",
        body,
        (name, data) => {
          if (name === "token") {
            text.textContent += data.text;
            reply.dataset.pieces = String(Number(reply.dataset.pieces) + 1);
            log.scrollTop = log.scrollHeight;
          } else if (name === "done") {
            reply.dataset.state = "done";
            info.textContent = `${data.pieces} pieces in ${data.seconds.toFixed(2)} s`;
          } else if (name === "error") {
            reply.dataset.state = "error";
            info.textContent = data.message;
          }
        },
        controller.signal,
      );
    } catch (error) {
      reply.dataset.state = error.name === "AbortError" ? "stopped" : "error";
      info.textContent = error.name === "AbortError" ? "stopped" : error.message;
    } finally {
      messages.push({ role: "assistant", content: text.textContent });
      controller = null;
      send.disabled = false;
      stop.disabled = true;
      input.focus();
    }
  }

  return () => controller?.abort();
}
