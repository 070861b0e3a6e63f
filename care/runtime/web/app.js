// CARE Edge web chat: served by `care serve` at /, no build step, nothing from the network but this server.
// Model text is never HTML: renderMarkdown() builds DOM nodes with textContent only (a safe subset of Markdown:
// paragraphs, lists, headings, code, bold, italic), so a reply holding <img src=x onerror=...> shows as text.
"use strict";

const STORE = "care.chats.v1";
const KEY = "care.key";
const $ = (id) => document.getElementById(id);

// ---- saved chats (this browser only) -------------------------------------------------------------
function loadChats() {
  try { return JSON.parse(localStorage.getItem(STORE)) || []; } catch (e) { return []; }
}
function saveChats() { localStorage.setItem(STORE, JSON.stringify(chats)); }
let chats = loadChats();
let current = null;
let busy = false;

function newChat() {
  current = { id: Date.now().toString(36), title: "", domain: $("domain").value, created: new Date().toISOString(),
              items: [], api: [] };
  chats.unshift(current);
  saveChats();
  render();
}

function openChat(id) {
  current = chats.find((c) => c.id === id) || null;
  if (current) $("domain").value = current.domain || "auto";
  render();
}

// ---- access key: a pairing link (#key=...) or typed once ------------------------------------------
function takeKeyFromLink() {
  const m = location.hash.match(/(?:^#|&)key=([^&]+)/);
  if (m) {
    localStorage.setItem(KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);  // the key leaves the address bar
  }
}
function authHeaders() {
  const key = localStorage.getItem(KEY);
  return key ? { Authorization: "Bearer " + key } : {};
}
function askForKey(message) {
  showBanner(message);
  $("key-form").hidden = false;
  $("key").focus();
}
function showBanner(text) {
  const b = $("banner");
  b.textContent = text || "";
  b.hidden = !text;
}

// ---- safe Markdown --------------------------------------------------------------------------------
function inline(parent, text) {
  // **bold**, *italic* / _italic_, `code`; everything else is plain text.
  const re = /(\*\*[^*]+\*\*|`[^`]+`|\*[^*\s][^*]*\*|_[^_\s][^_]*_)/g;
  let last = 0;
  for (const m of text.matchAll(re)) {
    if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
    const tok = m[0];
    const el = document.createElement(tok.startsWith("**") ? "strong" : tok.startsWith("`") ? "code" : "em");
    el.textContent = tok.startsWith("**") ? tok.slice(2, -2) : tok.slice(1, -1);
    parent.appendChild(el);
    last = m.index + tok.length;
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}
function renderMarkdown(target, text) {
  target.replaceChildren();
  const lines = text.replace(/\r/g, "").split("\n");
  let list = null, para = null, code = null;
  const close = () => { list = null; para = null; };
  for (const line of lines) {
    if (line.trim().startsWith("```")) {
      if (code) { code = null; } else { close(); const pre = document.createElement("pre"); code = document.createElement("code");
        pre.appendChild(code); target.appendChild(pre); }
      continue;
    }
    if (code) { code.textContent += line + "\n"; continue; }
    const bullet = line.match(/^\s*(?:[-*•]|(\d+)[.)])\s+(.*)$/);
    const heading = line.match(/^\s*#{1,4}\s+(.*)$/);
    if (bullet) {
      const kind = bullet[1] ? "OL" : "UL";
      if (!list || list.tagName !== kind) { list = document.createElement(kind.toLowerCase()); target.appendChild(list); para = null; }
      const li = document.createElement("li"); inline(li, bullet[2]); list.appendChild(li);
    } else if (heading) {
      close(); const h = document.createElement("h4"); inline(h, heading[1]); target.appendChild(h);
    } else if (!line.trim()) {
      close();
    } else {
      list = null;
      if (!para) { para = document.createElement("p"); target.appendChild(para); } else { para.appendChild(document.createElement("br")); }
      inline(para, line);
    }
  }
}

// ---- drawing -----------------------------------------------------------------------------------------
function itemNode(item) {
  const el = document.createElement("div");
  el.className = "msg " + item.kind;
  if (item.kind === "ask") {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "ask";
    b.textContent = "Ask the assistant anyway (its reply is not vetted first aid)";
    b.addEventListener("click", () => {
      const lastUser = [...current.api].reverse().find((m) => m.role === "user");
      if (!busy && lastUser) send(lastUser.content, true);
    });
    el.appendChild(b);
    return el;
  }
  if (item.kind === "card") {
    const lines = item.text.split("\n");
    const title = document.createElement("h3");
    title.textContent = /^\d+\./.test(lines[0]) ? "First aid" : lines.shift();
    const ol = document.createElement("ol");
    for (const l of lines) {
      if (!l.trim()) continue;
      const li = document.createElement("li"); li.textContent = l.replace(/^\d+\.\s*/, ""); ol.appendChild(li);
    }
    el.append(title, ol);
  } else if (item.kind === "assistant") {
    renderMarkdown(el, item.text);
  } else {
    el.textContent = item.text;
  }
  return el;
}
function render() {
  const log = $("log");
  const nodes = current ? current.items.map(itemNode) : [];
  log.replaceChildren(...nodes);
  // After a flagged turn, its notice stays at the top of the view; otherwise the newest message shows.
  const items = current ? current.items : [];
  let lastUser = -1;
  items.forEach((it, i) => { if (it.kind === "user") lastUser = i; });
  const notice = items.findIndex((it, i) => i > lastUser && it.kind === "notice");
  pinned = notice >= 0 ? nodes[notice] : null;
  follow();
  const ol = $("chat-list");
  ol.replaceChildren(...chats.map((c) => {
    const li = document.createElement("li");
    if (current && c.id === current.id) li.className = "current";
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = (c.title || "New chat") + " · " + c.created.slice(0, 10);
    b.addEventListener("click", () => { openChat(c.id); $("chats").hidden = true; });
    li.appendChild(b);
    return li;
  }));
}
let pinned = null;  // this turn's emergency notice: kept in view at the top while the card and reply arrive
function follow() {
  const log = $("log");
  if (pinned && pinned.isConnected) log.scrollTop = pinned.offsetTop - log.offsetTop - 8;
  else log.scrollTop = log.scrollHeight;
}
function add(kind, text) {
  const item = { kind, text };
  current.items.push(item);
  const node = itemNode(item);
  $("log").appendChild(node);
  if (kind === "notice") pinned = node;
  follow();
  return { item, node };
}

// ---- sending -----------------------------------------------------------------------------------------
async function send(text, anyway = false) {
  // anyway: the model's own reply to the last (flagged) message, after its card; the notice and card stay.
  if (!current) newChat();
  if (!current.title) current.title = text.slice(0, 40);
  let prefix = "";
  if (anyway) {
    prefix = current.api.pop().content + "\n\n";
    const last = current.items[current.items.length - 1];
    if (last && last.kind === "ask") current.items.pop();
    render();
  } else {
    add("user", text);
    current.api.push({ role: "user", content: text });
  }
  saveChats();
  busy = true;
  $("send").disabled = true;
  showBanner("");
  const body = { messages: current.api, stream: true };
  if (anyway) body.care_emergency_reply = "model";
  if ($("domain").value !== "auto") body.care_domain = $("domain").value;
  const started = performance.now();
  pinned = null;
  let shown = prefix;  // the assistant turn as the server records it
  let reply = null;
  let flagged = false;
  try {
    const res = await fetch("v1/chat/completions", { method: "POST", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", ...authHeaders() } });
    if (res.status === 401) {
      current.items.pop(); current.api.pop(); render();
      askForKey("The access key is missing or wrong. Enter the key the clinic gave you, or scan the QR code shown on the clinic laptop.");
      return text;
    }
    if (!res.ok) {
      let msg = "The server answered " + res.status;
      try { msg = (await res.json()).error.message; } catch (e) { /* not JSON */ }
      add("error", msg);
      return null;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const obj = JSON.parse(data);
        if (obj.error) { add("error", obj.error.message); continue; }
        const delta = (obj.choices && obj.choices[0] && obj.choices[0].delta) || {};
        const content = delta.content || "";
        if (obj.care_safety) { if (!anyway) { add("notice", obj.care_safety.message); shown += content; } flagged = true; continue; }
        if (obj.care_card) { if (!anyway) { add("card", obj.care_card.text); shown += content; } continue; }
        if (obj.care_unvetted) { add("unvetted", content.trim()); shown += content; reply = null; continue; }
        if (!content) continue;
        if (!reply) {
          reply = add("assistant", "");
          if (!window.careFirstTokenMs) window.careFirstTokenMs = performance.now() - started;  // bench/web_ttft.py
        }
        reply.item.text += content;
        shown += content;
        renderMarkdown(reply.node, reply.item.text);
        follow();
      }
    }
    current.api.push({ role: "assistant", content: anyway ? prefix + shown.slice(prefix.length).replace(/^\n+/, "") : shown });
    if (flagged && !anyway && !reply) current.items.push({ kind: "ask", text: "Ask the assistant anyway" });
  } catch (e) {
    add("error", "No answer from the clinic computer (" + e.message + "). Check the Wi-Fi and try again.");
  } finally {
    busy = false;
    $("send").disabled = false;
    saveChats();
    render();
  }
  return null;
}

function exportChat() {
  if (!current) return;
  const lines = ["# " + (current.title || "Chat"), "", "Started " + current.created, ""];
  const names = { user: "You", assistant: "CARE", notice: "Emergency notice", card: "First aid", unvetted: "Note",
                  note: "Note", error: "Error" };
  for (const it of current.items) lines.push("## " + (names[it.kind] || it.kind), "", it.text, "");
  const blob = new Blob([lines.join("\n")], { type: "text/markdown" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "care-chat-" + current.created.slice(0, 10) + "-" + current.id + ".md";
  a.click();
  URL.revokeObjectURL(a.href);
}

// ---- wiring ------------------------------------------------------------------------------------------
let pending = null;  // a message held back while the key is asked for
takeKeyFromLink();
window.addEventListener("hashchange", takeKeyFromLink);  // a pairing link opened on a page already open
current = chats[0] || null;
if (current) $("domain").value = current.domain || "auto";
render();
$("send-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("text").value.trim();
  if (!text || busy) return;
  $("text").value = "";
  pending = await send(text);
});
$("text").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("send-form").requestSubmit(); }
});
$("key-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  localStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  $("key-form").hidden = true;
  showBanner("");
  if (pending) { const text = pending; pending = null; pending = await send(text); }
});
$("new").addEventListener("click", () => { if (!busy) newChat(); });
$("menu").addEventListener("click", () => { $("chats").hidden = !$("chats").hidden; });
$("export").addEventListener("click", exportChat);
$("forget-key").addEventListener("click", () => { localStorage.removeItem(KEY); showBanner("Key forgotten on this device."); });
$("domain").addEventListener("change", () => { if (current && !current.api.length) { current.domain = $("domain").value; saveChats(); } });
