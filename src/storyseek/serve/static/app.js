// The story page: one POST /v1/chat/completions with stream: true, read as server-sent events.
// The story text arrives as pieces; the server puts the moral after "\n\nMoral: " (story mode).
"use strict";

const LENGTHS = { short: 120, medium: 250, long: 400 };  // new tokens, capped by the server's limit
const SURPRISE = [  // temperature for each step of the slider
  [0.2, "hardly"], [0.4, "a little"], [0.6, "some"], [0.8, "quite"], [1.0, "very"],
];
const MORAL = "\n\nMoral: ";

const $ = (id) => document.getElementById(id);
let limits = { max_tokens: 512, max_prompt_chars: 1000, api_key: false };
let writing = null;  // the AbortController of the story being written

function show(text) {
  $("message").textContent = text;
  $("message").hidden = !text;
}

function setSurpriseWord() {
  $("surprise-word").textContent = SURPRISE[$("surprise").value][1];
}

function countChars() {
  const n = $("prompt").value.length, max = limits.max_prompt_chars;
  $("count").textContent = n > max * 0.8 ? `${n} / ${max} letters` : "";
  $("count").classList.toggle("over", n > max);
}

function render(text, done) {
  const cut = text.indexOf(MORAL);
  const story = cut < 0 ? text : text.slice(0, cut);
  $("story").textContent = story;
  $("story").classList.toggle("writing", !done);
  $("moral").hidden = cut < 0;
  // The template's moral is one line: a model that rambles on after it does not get the box.
  $("moral-text").textContent = cut < 0 ? "" : text.slice(cut + MORAL.length).split(/\n|<\|/)[0];
}

function busy(on) {
  $("go").disabled = on;
  $("go").textContent = on ? "Writing\u2026" : "Tell me a story";
  $("stop").hidden = !on;
  $("again").hidden = on || !$("story").textContent;
}

async function explain(response) {
  let detail = "";
  try { detail = (await response.json()).error.message; } catch (e) { /* not JSON */ }
  switch (response.status) {
    case 429: return "The storyteller is busy with other stories right now. Please try again in a moment.";
    case 413: return `That is too long for the storyteller. Please make it shorter (${detail}).`;
    case 401: $("key-box").hidden = false; return "This storyteller needs the right key. Please type it above.";
    case 503: return "The storyteller is just waking up. Please try again in a few seconds.";
    default: return `Something went wrong: ${detail || response.statusText}`;
  }
}

async function tell() {
  const prompt = $("prompt").value.trim();
  if (prompt.length > limits.max_prompt_chars) {
    show(`That is too long: please use at most ${limits.max_prompt_chars} letters (you have ${prompt.length}).`);
    return;
  }
  show("");
  const length = document.querySelector("input[name=length]:checked").value;
  const body = {
    messages: [{ role: "user", content: prompt }],
    max_tokens: Math.min(LENGTHS[length], limits.max_tokens),
    temperature: SURPRISE[$("surprise").value][0],
    stream: true,
  };
  const headers = { "Content-Type": "application/json" };
  const key = $("key").value.trim() || localStorage.getItem("storyseek-key");
  if (key) headers["Authorization"] = `Bearer ${key}`;

  writing = new AbortController();
  busy(true);
  $("story-box").hidden = false;
  render("", false);
  let text = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers, body: JSON.stringify(body), signal: writing.signal,
    });
    if (!response.ok) {
      show(await explain(response));
      $("story-box").hidden = true;
      return;
    }
    if (key) localStorage.setItem("storyseek-key", key);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split(/\r?\n\r?\n/);
      buffer = events.pop();
      for (const event of events) {
        for (const line of event.split(/\r?\n/)) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          for (const choice of chunk.choices) text += choice.delta.content || "";
        }
      }
      render(text, false);
    }
    if (!text.trim()) show("The storyteller could not think of anything this time. Try again?");
  } catch (e) {
    if (e.name !== "AbortError") show(`The story stopped: ${e.message}`);
  } finally {
    render(text, true);
    writing = null;
    busy(false);
  }
}

$("ask").addEventListener("submit", (e) => { e.preventDefault(); tell(); });
$("again").addEventListener("click", () => tell());
$("stop").addEventListener("click", () => writing && writing.abort());
$("prompt").addEventListener("input", countChars);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); if (!writing) tell(); }
});
$("surprise").addEventListener("input", setSurpriseWord);
setSurpriseWord();

fetch("/health").then((r) => r.json()).then((h) => {
  if (h.limits) limits = h.limits;
  if (limits.api_key && !localStorage.getItem("storyseek-key")) $("key-box").hidden = false;
  countChars();
}).catch(() => {});
