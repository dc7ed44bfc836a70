// LLM-QP playground: streams /v1/chat/completions (SSE read with fetch + a reader) and draws each token by
// the plan of the step that produced it, from the `llmqp.tokens` field of every streamed chunk
// ({id, text, plan, k, latency_ms, logprob} per token). No dependencies, no build step.
"use strict";

const PLANS = {
  forced: {color: "#8c959f", label: "forced", help: "only one token was allowed: no scoring at all"},
  drafted: {color: "#8250df", label: "drafted", help: "drafted ahead and accepted by the constraint"},
  sparse: {color: "#1a7f37", label: "sparse", help: "scored only the K allowed rows of the unembedding"},
  sparse_union: {color: "#0a7ea4", label: "sparse_union", help: "scored the union of a batch's allowed rows"},
  dense: {color: "#d4a72c", label: "dense", help: "scored the whole vocabulary (then masked)"},
};
const OTHER_PLAN = {color: "#cf222e", label: "other", help: ""};

const SCHEMA_EXAMPLES = {
  "Person": {
    prompt: "Give me a user record for Ada Lovelace, born 1815.",
    schema: {type: "object", properties: {
      name: {type: "string", maxLength: 40},
      birth_year: {type: "integer", minimum: 1000, maximum: 2100},
      occupation: {type: "string", maxLength: 40},
      alive: {type: "boolean"}},
      required: ["name", "birth_year", "occupation", "alive"]},
  },
  "Weather report": {
    prompt: "Describe today's weather in Lisbon: sunny, 24 degrees.",
    schema: {type: "object", properties: {
      city: {type: "string", maxLength: 30},
      temperature_c: {type: "number", minimum: -60, maximum: 60},
      conditions: {enum: ["sunny", "cloudy", "rain", "snow", "storm"]}},
      required: ["city", "temperature_c", "conditions"]},
  },
  "Yes/no with confidence": {
    prompt: "Is the Pacific the largest ocean on Earth?",
    schema: {type: "object", properties: {
      answer: {enum: ["yes", "no"]},
      confidence: {enum: ["low", "medium", "high"]}},
      required: ["answer", "confidence"]},
  },
  "Shopping list": {
    prompt: "List three things to buy for a picnic, with quantities.",
    schema: {type: "object", properties: {
      items: {type: "array", minItems: 1, maxItems: 3, items: {type: "object", properties: {
        item: {type: "string", maxLength: 20}, quantity: {type: "integer", minimum: 1, maximum: 12}},
        required: ["item", "quantity"]}}},
      required: ["items"]},
  },
};

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "llmqp.apiKey";
let running = null;  // {controller, lanes} of the generation in flight

// ------------------------------------------------------------------ setup
function init() {
  const pick = $("schema-example");
  for (const name of Object.keys(SCHEMA_EXAMPLES)) pick.add(new Option(name, name));
  pick.addEventListener("change", () => loadExample(pick.value, true));
  loadExample(pick.value, false);

  $("constraint-kind").addEventListener("change", showConstraint);
  showConstraint();

  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("input", () => {
    if (key.value) localStorage.setItem(KEY_STORAGE, key.value);
    else localStorage.removeItem(KEY_STORAGE);
  });

  $("controls").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  $("stop").addEventListener("click", () => running && running.controller.abort());
  $("show-k").addEventListener("change", () =>
    document.body.classList.toggle("show-k", $("show-k").checked));
  document.body.classList.toggle("show-k", $("show-k").checked);

  drawLegend();
  setupTooltip();
  checkHealth();
}

function loadExample(name, withPrompt) {
  const ex = SCHEMA_EXAMPLES[name];
  $("schema").value = JSON.stringify(ex.schema, null, 2);
  if (withPrompt) $("prompt").value = ex.prompt;
}

function showConstraint() {
  const kind = $("constraint-kind").value;
  for (const box of document.querySelectorAll(".constraint")) box.hidden = box.dataset.kind !== kind;
}

function drawLegend() {
  const legend = $("legend");
  for (const [name, p] of Object.entries(PLANS)) {
    const chip = document.createElement("span");
    chip.className = `tok plan-${name}`;
    chip.textContent = p.label;
    chip.title = p.help;
    legend.append(chip);
  }
}

async function checkHealth() {
  try {
    const r = await fetch("/health");
    const body = await r.json();
    $("model").textContent = r.ok ? `model: ${body.model}` : `server: ${body.status}${body.error ? " — " + body.error : ""}`;
    if (!r.ok && body.status === "loading") setTimeout(checkHealth, 2000);
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

// ------------------------------------------------------------------ request
class UserError extends Error {}

function constraintFromForm() {
  const kind = $("constraint-kind").value;
  if (kind === "none") return null;
  if (kind === "json") {
    let schema;
    try {
      schema = JSON.parse($("schema").value);
    } catch (e) {
      throw new UserError(`The schema is not valid JSON: ${e.message}`);
    }
    return {json: schema};
  }
  if (kind === "choice") {
    const choices = $("choices").value.split("\n").map((s) => s.trim()).filter(Boolean);
    if (!choices.length) throw new UserError("Enter at least one choice (one per line).");
    return {choice: choices};
  }
  const text = $(kind).value;
  if (!text.trim()) throw new UserError(`Enter a ${kind}.`);
  return {[kind]: text};
}

function numberField(id, name, integer) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new UserError(`${name} must be ${integer ? "an integer" : "a number"}, got "${raw}".`);
  }
  return value;
}

function requestBody(constraint) {
  const body = {
    messages: [{role: "user", content: $("prompt").value}],
    stream: true,
    max_tokens: numberField("max-tokens", "max tokens", true),
    temperature: numberField("temperature", "temperature", false),
    top_p: numberField("top-p", "top-p", false),
    seed: numberField("seed", "seed", true),
  };
  if (constraint) body.structured_outputs = constraint;
  return body;
}

async function generate() {
  if (running) running.controller.abort();
  const lanes = $("lanes");
  lanes.replaceChildren();
  $("race-note").hidden = true;
  const race = $("race").checked;
  const kind = $("constraint-kind").value;
  let jobs;
  try {
    if (!$("prompt").value.trim()) throw new UserError("Enter a prompt.");
    const constraint = constraintFromForm();
    const label = kind === "none" ? "free text" : `constrained: ${$("constraint-kind").selectedOptions[0].text}`;
    jobs = [{title: label, body: requestBody(constraint)}];
    if (race) {
      if (!constraint) throw new UserError("Race mode compares a constraint with free text: pick a constraint.");
      jobs.push({title: "unconstrained", body: requestBody(null)});
    }
  } catch (e) {
    const lane = new Lane("not sent");
    lane.fail(e.message);
    lanes.append(lane.root);
    return;
  }
  lanes.classList.toggle("race", jobs.length > 1);
  $("race-note").hidden = jobs.length < 2;
  const controller = new AbortController();
  const laneObjs = jobs.map((job) => new Lane(job.title));
  laneObjs.forEach((lane) => lanes.append(lane.root));
  running = {controller, lanes: laneObjs};
  $("generate").disabled = true;
  $("stop").disabled = false;
  try {
    await Promise.all(jobs.map((job, i) => streamInto(laneObjs[i], job.body, controller.signal)));
  } finally {
    if (running && running.controller === controller) running = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

function describeHttpError(status, body) {
  const message = (body && body.error && body.error.message) || (typeof body === "string" && body) ||
    "no details";
  if (status === 401) return `Not authorized (401): ${message}. Enter the server's API key under "API key".`;
  if (status === 429) return `The server is busy (429): ${message}`;
  if (status === 503) return `The server is not ready (503): ${message}`;
  if (status === 400) return `Bad request (400): ${message}`;
  return `Server error (${status}): ${message}`;
}

async function streamInto(lane, body, signal) {
  lane.start();
  let response;
  try {
    response = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body),
                                                    signal});
  } catch (e) {
    lane.fail(e.name === "AbortError" ? "Stopped." : `Network error: could not reach the server (${e.message}).`);
    return;
  }
  if (!response.ok) {
    const text = await response.text().catch(() => "");
    let parsed = text;
    try { parsed = JSON.parse(text); } catch (e) { /* not JSON: show the text */ }
    lane.fail(describeHttpError(response.status, parsed));
    return;
  }
  try {
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        lane.fail(`Error during generation: ${chunk.error.message}`);
        return;
      }
      for (const choice of chunk.choices || []) {
        const delta = (choice.delta && choice.delta.content) || "";
        const tokens = (choice.llmqp && choice.llmqp.tokens) || [];
        if (delta || tokens.length) lane.add(delta, tokens);
        if (choice.finish_reason) lane.finish(choice.finish_reason);
      }
    }
    if (lane.state === "running") lane.fail("The stream ended before the answer was finished.");
  } catch (e) {
    lane.fail(e.name === "AbortError" ? "Stopped." : `Network error while streaming: ${e.message}`);
  }
}

// Yields the data of each server-sent event ("data: ..." lines joined), as text.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const lines = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
      if (lines.length) yield lines.join("\n");
    }
  }
}

// ------------------------------------------------------------------ one stream's view
class Lane {
  constructor(title) {
    this.root = $("lane-template").content.firstElementChild.cloneNode(true);
    this.root.querySelector(".lane-title").textContent = title;
    this.output = this.root.querySelector(".output");
    this.canvas = this.root.querySelector(".chart");
    this.state = "idle";
    this.steps = [];  // every token record, in order (also those whose text is held back)
    this.pending = [];  // token records whose text has not arrived yet
    this.planCounts = {};
    this.drawQueued = false;
  }

  setState(state) {
    this.state = state;
    this.root.dataset.state = state;
  }

  start() {
    this.setState("running");
    this.t0 = performance.now();
    this.tFirst = null;
    this.tokensAtFirst = 0;
  }

  add(delta, tokens) {
    const now = performance.now();
    if (tokens.length) {
      if (this.tFirst === null) {
        this.tFirst = now;
        this.tokensAtFirst = tokens.length;
      }
      this.tLast = now;
      for (const t of tokens) {
        this.steps.push(t);
        this.planCounts[t.plan] = (this.planCounts[t.plan] || 0) + 1;
      }
      this.pending.push(...tokens);
    }
    if (delta) {
      this.appendText(delta, this.pending);
      this.pending = [];
    }
    this.updateStats();
  }

  // The delta is what the server says the text is; split it into one span per token when the tokens'
  // own texts add up to it (else a multi-byte character or a stop string changed it: one span for all).
  appendText(delta, tokens) {
    if (tokens.length && tokens.map((t) => t.text).join("") === delta) {
      for (const t of tokens) this.output.append(tokenSpan(t.text, [t]));
    } else {
      this.output.append(tokenSpan(delta, tokens));
    }
  }

  finish(reason) {
    this.root.querySelector(".finish").textContent = reason;
    if (this.state === "running") this.setState("done");
    this.updateStats();
  }

  fail(message) {
    const box = this.root.querySelector(".error");
    box.textContent = message;
    box.hidden = false;
    this.setState("error");
  }

  updateStats() {
    const q = (sel) => this.root.querySelector(sel);
    const n = this.steps.length;
    q(".tokens").textContent = String(n);
    if (this.tFirst !== null) q(".ttft").textContent = `${Math.round(this.tFirst - this.t0)} ms`;
    // Decode speed: tokens after the first event over the time since it (the first includes the prefill).
    const span = (this.tLast - this.tFirst) / 1000;
    if (n > this.tokensAtFirst && span > 0) q(".tps").textContent = ((n - this.tokensAtFirst) / span).toFixed(1);
    this.drawMix();
    if (!this.drawQueued) {
      this.drawQueued = true;
      requestAnimationFrame(() => { this.drawQueued = false; drawChart(this.canvas, this.steps); });
    }
  }

  drawMix() {
    const n = this.steps.length || 1;
    const bar = this.root.querySelector(".mix");
    const labels = this.root.querySelector(".mix-labels");
    bar.replaceChildren();
    labels.replaceChildren();
    for (const [plan, count] of Object.entries(this.planCounts)) {
      const seg = document.createElement("span");
      seg.style.width = `${(100 * count) / n}%`;
      seg.style.background = planStyle(plan).color;
      seg.title = `${plan}: ${count}`;
      bar.append(seg);
      const label = document.createElement("span");
      label.className = `mix-label plan-${plan}`;
      label.textContent = `${plan} ${count} (${Math.round((100 * count) / n)}%)`;
      labels.append(label);
    }
  }
}

function planStyle(plan) {
  return PLANS[plan] || OTHER_PLAN;
}

function tokenSpan(text, tokens) {
  const span = document.createElement("span");
  span.textContent = text;
  const last = tokens[tokens.length - 1];
  span.className = last ? `tok plan-${PLANS[last.plan] ? last.plan : "other"}` : "tok plan-none";
  if (last) {
    span.dataset.plan = last.plan;
    span.dataset.k = String(last.k);
  }
  span.tokens = tokens;
  return span;
}

// ------------------------------------------------------------------ latency chart
function drawChart(canvas, steps) {
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 560;
  const height = canvas.clientHeight || 140;
  if (canvas.width !== Math.round(width * dpr)) {
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const left = 38, top = 14, bottom = 16;
  const plotW = width - left - 4, plotH = height - top - bottom;
  ctx.font = "10px system-ui, sans-serif";
  ctx.fillStyle = "#57606a";
  ctx.fillText("step latency (ms), one bar per token", left, 10);
  if (!steps.length) return;
  // The first steps include compiles (seconds); a scale set by them would flatten every other bar, so the
  // scale stops at ~3x the 90th percentile and taller bars are clipped (marked red at the top).
  const sorted = steps.map((s) => s.latency_ms).sort((a, b) => a - b);
  const p90 = sorted[Math.floor(0.9 * (sorted.length - 1))];
  const max = niceCeil(Math.max(Math.min(sorted[sorted.length - 1], 3 * p90), 0.001));
  ctx.strokeStyle = "#d0d7de";
  ctx.beginPath();
  for (const frac of [0, 0.5, 1]) {
    const y = top + plotH * (1 - frac);
    ctx.moveTo(left, y + 0.5);
    ctx.lineTo(left + plotW, y + 0.5);
    ctx.fillText(fmtMs(max * frac), 2, y + 3);
  }
  ctx.stroke();
  const barW = plotW / Math.max(steps.length, 20);
  let clipped = 0;
  steps.forEach((s, i) => {
    const h = Math.max(1, Math.min(plotH, (plotH * s.latency_ms) / max));
    const x = left + i * barW, w = Math.max(1, barW - (barW > 3 ? 1 : 0));
    ctx.fillStyle = planStyle(s.plan).color;
    ctx.fillRect(x, top + plotH - h, w, h);
    if (s.latency_ms > max) {
      clipped += 1;
      ctx.fillStyle = "#cf222e";
      ctx.fillRect(x, top, w, 3);
    }
  });
  ctx.fillStyle = "#57606a";
  const note = clipped ? `${steps.length} tokens · ${clipped} clipped (max ${fmtMs(sorted[sorted.length - 1])} ms)`
    : `${steps.length} tokens`;
  ctx.textAlign = "right";
  ctx.fillText(note, left + plotW, height - 3);
  ctx.textAlign = "left";
}

function niceCeil(x) {
  const p = 10 ** Math.floor(Math.log10(x));
  for (const m of [1, 2, 5, 10]) if (x <= m * p) return m * p;
  return 10 * p;
}

function fmtMs(ms) {
  if (ms === 0) return "0";
  return ms >= 10 ? String(Math.round(ms)) : ms.toFixed(ms >= 1 ? 1 : 2);
}

// ------------------------------------------------------------------ token details (hover, or tap to pin)
function setupTooltip() {
  const tip = $("tooltip");
  let pinned = null;
  const show = (span) => {
    tip.replaceChildren(...tokenDetails(span));
    tip.hidden = false;
    const r = span.getBoundingClientRect();
    const x = Math.min(window.innerWidth - tip.offsetWidth - 8, Math.max(8, r.left));
    const below = r.bottom + 6 + tip.offsetHeight < window.innerHeight;
    tip.style.left = `${x + window.scrollX}px`;
    tip.style.top = `${(below ? r.bottom + 6 : r.top - tip.offsetHeight - 6) + window.scrollY}px`;
  };
  document.addEventListener("mouseover", (e) => {
    const span = e.target.closest && e.target.closest(".output .tok");
    if (span) show(span);
    else if (!pinned) tip.hidden = true;
  });
  document.addEventListener("click", (e) => {
    const span = e.target.closest && e.target.closest(".output .tok");
    if (span) {
      pinned = span;
      show(span);
    } else if (!tip.contains(e.target)) {
      pinned = null;
      tip.hidden = true;
    }
  });
}

function tokenDetails(span) {
  const tokens = span.tokens || [];
  if (!tokens.length) {
    const p = document.createElement("div");
    p.textContent = "text without a token of its own (held back and released at the end)";
    return [p];
  }
  return tokens.map((t) => {
    const row = document.createElement("div");
    row.className = "tip-row";
    const head = document.createElement("div");
    head.innerHTML = `<b class="plan-name"></b> <code class="tip-text"></code> <span class="muted"></span>`;
    head.querySelector(".plan-name").textContent = t.plan;
    head.querySelector(".plan-name").style.color = planStyle(t.plan).color;
    head.querySelector(".tip-text").textContent = JSON.stringify(t.text);
    head.querySelector(".muted").textContent = `id ${t.id}`;
    const facts = document.createElement("div");
    const prob = Math.exp(t.logprob);
    facts.textContent = `K = ${t.k.toLocaleString()} allowed · step ${fmtMs(t.latency_ms)} ms · ` +
      `log-prob ${t.logprob.toFixed(3)} (p = ${(100 * prob).toFixed(prob > 0.999 ? 0 : 1)}%)`;
    row.append(head, facts);
    return row;
  });
}

init();
