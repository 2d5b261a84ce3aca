// PerfXChat in the browser. Conversations and settings live in this browser's localStorage; answers stream
// from the server's own /v1/chat/completions (server-sent events read through fetch). Model text reaches the
// page only as text nodes (textContent, append of strings): it is never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const DEFAULTS = { system: "", temperature: 0.7, top_p: 0.9, top_k: 0, max_tokens: 512, seed: null };
const NEW_TITLE = "New chat";

const store = {
  get(key, fallback) {
    try {
      return JSON.parse(localStorage.getItem(`perfxchat.${key}`)) ?? fallback;
    } catch {
      return fallback;
    }
  },
  set(key, value) {
    localStorage.setItem(`perfxchat.${key}`, JSON.stringify(value));
  },
};

// [{id, title, messages: [{role, content, stats?, error?}]}], the most recently used first
let conversations = store.get("conversations", []);
let currentId = store.get("current", null);
let settings = { ...DEFAULTS, ...store.get("settings", {}) };
let running = null; // {controller, conversation, reply} while an answer streams
let afterKey = null; // what to retry once the user has given an API key
const views = new WeakMap(); // message -> its element on the page

function save() {
  try {
    store.set("conversations", conversations);
    store.set("current", currentId);
  } catch (e) {
    alert(`Could not save the conversations in this browser: ${e.message}`);
  }
}

function current() {
  return conversations.find((c) => c.id === currentId);
}

// el("p", {class: "x", text: "..."}, child, "text", ...): strings become text nodes, never markup.
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "label") node.setAttribute("aria-label", value);
    else node[key] = value;
  }
  node.append(...children);
  return node;
}

// -- Markdown: fenced code, headings, lists, quotes, rules and paragraphs; inline code, bold, italic and
// http(s) links. Anything else stays as it was written.
const FENCE = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^(#{1,6})\s+(.*)/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
const BULLET = /^\s*[-*+]\s+/;
const NUMBER = /^\s*(\d{1,9})[.)]\s+/;
const QUOTE = /^\s*>\s?/;
const BLOCKS = [FENCE, HEADING, RULE, BULLET, NUMBER, QUOTE];
const CODE_SPAN = /`([^`\n]+)`/g;
const EMPHASIS = new RegExp(
  [
    /\*\*(?=\S)(.*?\S)\*\*/, // **bold**
    /(?<!\w)__(?=\S)(.*?\S)__(?!\w)/, // __bold__, not snake__case
    /\*(?=[^\s*])(.*?[^\s*])\*/, // *italic*, not 2 * 3 * 4
    /(?<!\w)_(?=\S)(.*?\S)_(?!\w)/, // _italic_, not snake_case
    /\[([^\]\n]+)\]\((https?:\/\/[^\s()\uE000]+)\)/, // [label](url): http(s) links only
  ]
    .map((r) => r.source)
    .join("|"),
  "g",
);

function markdown(text) {
  const out = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = line.match(FENCE))) {
      const code = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(m[1]); i++) code.push(lines[i]);
      i++; // the closing fence, not there yet while the answer streams
      out.append(codeBlock(code.join("\n"), m[2]));
    } else if ((m = line.match(HEADING))) {
      out.append(el(`h${Math.min(m[1].length + 2, 6)}`, {}, ...inline(m[2])));
      i++;
    } else if (RULE.test(line)) {
      out.append(el("hr"));
      i++;
    } else if (BULLET.test(line) || NUMBER.test(line)) {
      const item = BULLET.test(line) ? BULLET : NUMBER;
      const list = el(item === BULLET ? "ul" : "ol");
      if (item === NUMBER) list.start = Number(line.match(NUMBER)[1]);
      for (; i < lines.length && item.test(lines[i]); i++) {
        let itemText = lines[i].replace(item, "");
        while (
          i + 1 < lines.length &&
          /^\s+\S/.test(lines[i + 1]) &&
          !BLOCKS.some((b) => b.test(lines[i + 1]))
        )
          itemText += ` ${lines[++i].trim()}`;
        list.append(el("li", {}, ...inline(itemText)));
      }
      out.append(list);
    } else if (QUOTE.test(line)) {
      const quoted = [];
      for (; i < lines.length && QUOTE.test(lines[i]); i++) quoted.push(lines[i].replace(QUOTE, ""));
      out.append(el("blockquote", {}, markdown(quoted.join("\n"))));
    } else if (!line.trim()) {
      i++;
    } else {
      const p = el("p");
      for (; i < lines.length && lines[i].trim() && !BLOCKS.some((b) => b.test(lines[i])); i++) {
        if (p.firstChild) p.append(el("br"));
        p.append(...inline(lines[i]));
      }
      out.append(p);
    }
  }
  return out;
}

// Code spans are set aside first (as numbered private-use marks) so that nothing inside them is markup.
function inline(text) {
  const codes = [];
  const marked = text
    .replace(/[\uE000\uE001]/g, "")
    .replace(CODE_SPAN, (_, code) => `\uE000${codes.push(code) - 1}\uE001`);
  return emphasis(marked, codes);
}

function emphasis(text, codes) {
  const nodes = [];
  let last = 0;
  for (const m of text.matchAll(EMPHASIS)) {
    const [whole, bold1, bold2, em1, em2, label, href] = m;
    nodes.push(...withCode(text.slice(last, m.index), codes));
    if (bold1 ?? bold2) nodes.push(el("strong", {}, ...emphasis(bold1 ?? bold2, codes)));
    else if (em1 ?? em2) nodes.push(el("em", {}, ...emphasis(em1 ?? em2, codes)));
    else
      nodes.push(el("a", { href, target: "_blank", rel: "noopener noreferrer" }, ...emphasis(label, codes)));
    last = m.index + whole.length;
  }
  nodes.push(...withCode(text.slice(last), codes));
  return nodes;
}

function withCode(text, codes) {
  return text.split(/\uE000(\d+)\uE001/).map((part, i) => (i % 2 ? el("code", { text: codes[part] }) : part));
}

function codeBlock(code, lang) {
  const bar = el("div", { class: "code-bar" }, el("span", { text: lang || "code" }));
  if (navigator.clipboard) {
    const copy = el("button", { type: "button", class: "copy", text: "Copy" });
    copy.addEventListener("click", async () => {
      await navigator.clipboard.writeText(code);
      copy.textContent = "Copied";
      setTimeout(() => (copy.textContent = "Copy"), 1500);
    });
    bar.append(copy);
  }
  return el("div", { class: "code" }, bar, el("pre", {}, el("code", { text: code })));
}

// -- The page ---------------------------------------------------------------------------------------------
function renderSidebar() {
  $("conversations").replaceChildren(
    ...conversations.map((c) => {
      const item = el("li", { class: c.id === currentId ? "active" : "" });
      const title = el("button", { type: "button", class: "title", text: c.title, title: c.title });
      const rename = el("button", { type: "button", class: "icon rename", text: "✎", label: "Rename" });
      const remove = el("button", { type: "button", class: "icon delete", text: "✕", label: "Delete" });
      title.addEventListener("click", () => select(c.id));
      rename.addEventListener("click", () => startRename(item, c));
      remove.addEventListener("click", () => removeConversation(c));
      item.append(title, rename, remove);
      return item;
    }),
  );
}

function startRename(item, c) {
  const input = el("input", { class: "rename-input", value: c.title, label: "New name" });
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    if (keep && input.value.trim()) c.title = input.value.trim();
    save();
    renderSidebar();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    else if (e.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
  item.replaceChildren(input);
  input.focus();
  input.select();
}

function removeConversation(c) {
  if (!confirm(`Delete "${c.title}"?`)) return;
  if (running?.conversation === c) running.controller.abort();
  conversations = conversations.filter((x) => x !== c);
  if (currentId === c.id) currentId = conversations[0]?.id ?? null;
  save();
  render();
}

function newConversation() {
  if (current()?.messages.length === 0) return current();
  const c = {
    id: `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`,
    title: NEW_TITLE,
    messages: [],
  };
  conversations.unshift(c);
  currentId = c.id;
  save();
  return c;
}

function select(id) {
  currentId = id;
  save();
  render();
  $("app").classList.remove("nav-open");
}

function render() {
  renderSidebar();
  const box = $("messages");
  const messages = current()?.messages ?? [];
  box.replaceChildren(...messages.map(messageView));
  if (!messages.length)
    box.append(
      el("p", { class: "empty", text: "Ask anything. Conversations are kept in this browser only." }),
    );
  box.scrollTop = box.scrollHeight;
}

function messageView(m) {
  const view = el("article", { class: `msg ${m.role}` }, el("div", { class: "body" }));
  if (running?.reply === m) view.classList.add("streaming");
  views.set(m, view);
  fill(m);
  return view;
}

function fill(m) {
  const view = views.get(m);
  if (!view) return;
  const body = view.firstChild;
  if (m.role === "assistant") body.replaceChildren(markdown(m.content));
  else body.textContent = m.content;
  view.querySelector(".meta")?.remove();
  if (m.error) view.append(el("div", { class: "meta error", text: m.error }));
  else if (m.stats) view.append(el("div", { class: "meta", text: statsText(m.stats) }));
}

function statsText(s) {
  const parts = [`${s.exact ? "" : "~"}${s.tokens} tokens`];
  if (s.tps != null) parts.push(`${s.tps.toFixed(1)} tok/s`);
  if (s.ttft != null) parts.push(`TTFT ${s.ttft.toFixed(2)} s`);
  if (s.finish === "stopped") parts.push("stopped");
  else if (s.finish === "length") parts.push("max tokens reached");
  return parts.join(" · ");
}

let frame = 0;
function redrawSoon(m) {
  // One redraw per animation frame however many tokens arrive, keeping the view at the bottom if it was.
  if (frame) return;
  frame = requestAnimationFrame(() => {
    frame = 0;
    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    fill(m);
    if (atBottom) box.scrollTop = box.scrollHeight;
  });
}

function setRunning(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
}

// -- The API ----------------------------------------------------------------------------------------------
function headers() {
  const key = store.get("apiKey", "");
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

function askKey(retry) {
  afterKey = retry;
  $("key-message").textContent = store.get("apiKey", "")
    ? "The server refused this API key: enter the one given to perfxllm serve --api-key."
    : "This server needs an API key (perfxllm serve --api-key).";
  $("key").value = "";
  if (!$("key-dialog").open) $("key-dialog").showModal();
}

async function errorText(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function loadModel() {
  try {
    const response = await fetch("v1/models", { headers: headers() });
    if (response.status === 401) return askKey(loadModel);
    if (response.ok) $("model").textContent = (await response.json()).data[0]?.id ?? "";
  } catch {
    $("model").textContent = "(server unreachable)";
  }
}

function requestBody(messages) {
  const system = settings.system.trim() ? [{ role: "system", content: settings.system }] : [];
  const body = {
    messages: [
      ...system,
      ...messages.filter((m) => m.content).map(({ role, content }) => ({ role, content })),
    ],
    stream: true,
    stream_options: { include_usage: true },
    temperature: settings.temperature,
    top_p: settings.top_p,
    max_tokens: settings.max_tokens,
  };
  if (settings.top_k) body.top_k = settings.top_k;
  if (settings.seed != null) body.seed = settings.seed;
  return body;
}

// The JSON of each server-sent event, until `data: [DONE]`.
async function* events(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer
        .slice(0, end)
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trim())
        .join("\n");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function answer(conversation) {
  const reply = { role: "assistant", content: "" };
  const sent = requestBody(conversation.messages);
  conversation.messages.push(reply);
  const controller = new AbortController();
  running = { controller, conversation, reply };
  if (conversation === current()) render();
  setRunning(true);
  const started = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  let finish = null;
  let unauthorized = false;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(sent),
      signal: controller.signal,
    });
    unauthorized = response.status === 401;
    if (!response.ok) throw new Error(await errorText(response));
    for await (const event of events(response.body)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices ?? []) {
        if (choice.delta?.content) {
          first ??= performance.now();
          chunks++;
          reply.content += choice.delta.content;
          redrawSoon(reply);
        }
        finish = choice.finish_reason ?? finish;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else reply.error = e instanceof TypeError ? `Could not reach the server: ${e.message}` : e.message;
  }
  const end = performance.now();
  running = null;
  setRunning(false);
  views.get(reply)?.classList.remove("streaming");
  if (unauthorized) {
    conversation.messages.pop();
    views.get(reply)?.remove();
    save();
    return askKey(() => answer(conversation));
  }
  const tokens = usage?.completion_tokens ?? chunks;
  reply.stats = {
    tokens,
    exact: usage != null,
    ttft: first && (first - started) / 1000,
    tps: first && tokens > 1 && end > first ? (tokens - 1) / ((end - first) / 1000) : null,
    finish,
  };
  save();
  fill(reply);
}

function send(text) {
  const c = current() ?? newConversation();
  c.messages.push({ role: "user", content: text });
  if (c.title === NEW_TITLE) c.title = text.replace(/\s+/g, " ").slice(0, 60);
  conversations = [c, ...conversations.filter((x) => x !== c)];
  save();
  render();
  answer(c);
}

// -- Settings, theme, wiring ------------------------------------------------------------------------------
function openSettings() {
  const form = $("settings-form");
  for (const [key, value] of Object.entries(settings)) form.elements[key].value = value ?? "";
  $("settings").showModal();
}

function saveSettings(e) {
  e.preventDefault();
  const f = $("settings-form").elements;
  settings = {
    system: f.system.value,
    temperature: Number(f.temperature.value),
    top_p: Number(f.top_p.value),
    top_k: Math.round(Number(f.top_k.value)),
    max_tokens: Math.round(Number(f.max_tokens.value)),
    seed: f.seed.value === "" ? null : Math.round(Number(f.seed.value)),
  };
  store.set("settings", settings);
  $("settings").close();
}

function applyTheme() {
  const theme = store.get("theme", null);
  if (theme) document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
}

function toggleTheme() {
  const dark = matchMedia("(prefers-color-scheme: dark)").matches;
  const shown = document.documentElement.dataset.theme ?? (dark ? "dark" : "light");
  store.set("theme", shown === "dark" ? "light" : "dark");
  applyTheme();
}

function submit(e) {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || running) return;
  $("input").value = "";
  $("input").style.height = "";
  send(text);
}

applyTheme();
$("composer").addEventListener("submit", submit);
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) submit(e);
});
$("input").addEventListener("input", () => {
  const input = $("input");
  input.style.height = "";
  input.style.height = `${Math.min(input.scrollHeight, 200)}px`;
});
$("stop").addEventListener("click", () => running?.controller.abort());
$("new-chat").addEventListener("click", () => {
  newConversation();
  select(currentId);
  $("input").focus();
});
$("menu").addEventListener("click", () => $("app").classList.toggle("nav-open"));
$("scrim").addEventListener("click", () => $("app").classList.remove("nav-open"));
$("theme").addEventListener("click", toggleTheme);
$("open-settings").addEventListener("click", openSettings);
$("settings-form").addEventListener("submit", saveSettings);
$("settings-cancel").addEventListener("click", () => $("settings").close());
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  store.set("apiKey", $("key").value.trim());
  $("key-dialog").close();
  const retry = afterKey;
  afterKey = null;
  retry?.();
});
if (!current()) currentId = conversations[0]?.id ?? null;
render();
loadModel();
