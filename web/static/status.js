// Keeps the status page current: polls the JSON endpoints every 2 s while work remains, every 15 s
// when idle, with If-None-Match so that an unchanged answer costs a 304.
"use strict";

const BUSY_MS = 2000;
const IDLE_MS = 15000;
const PARTS = ["done", "invalid", "failed", "running", "queued"];
const etags = {};
let lastTaskRun = Number(document.body.dataset.lastTaskRun || 0);
let generation = document.body.dataset.generation;

async function getJson(path) {
  const headers = etags[path] ? { "If-None-Match": etags[path] } : {};
  const answer = await fetch(path, { headers });
  if (answer.status === 304) return null;
  if (answer.headers.get("ETag")) etags[path] = answer.headers.get("ETag");
  return answer.json();
}

function text(id, value) {
  document.getElementById(id).textContent = String(value);
}

function pauseText(worker) {
  return worker.until ? `${worker.reason} (until ${worker.until})` : worker.reason;
}

function showHealth(health) {
  const worker = health.worker;
  document.getElementById("worker").className = "state-" + worker.state;
  text("worker-state", worker.state);
  text("queue", health.coins.queued);
  text("done", health.coins.done);
  const alert = document.getElementById("alert");
  alert.hidden = !worker.reason;
  alert.textContent = worker.reason ? pauseText(worker) : "";
  text("calls", health.upstream.calls_last_minute);
  const bar = document.getElementById("calls-bar");
  bar.value = Math.min(health.upstream.calls_last_minute, bar.max);
  const credits = health.credits;
  text("credits-used", credits.used);
  text("credits-limit", credits.limit === null ? "(no monthly cap)" : "of " + credits.limit);
  text("credits-resets", credits.resets);
}

function batchItem(batch) {
  const item = document.createElement("li");
  item.className = "batch";
  item.dataset.batch = batch.batch;
  const head = document.createElement("div");
  head.className = "batch-head";
  const id = document.createElement("code");
  id.textContent = batch.batch;
  const state = document.createElement("span");
  state.className = "batch-state";
  state.textContent = batch.complete ? "complete" : batch.eta !== null ? "ETA " + Math.round(batch.eta) + " s" : "open";
  head.append(id, state);
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.setAttribute("role", "progressbar");
  bar.setAttribute("aria-label", "batch " + batch.batch);
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", String(batch.submitted));
  bar.setAttribute("aria-valuenow", String(batch.submitted - batch.queued - batch.running));
  for (const part of PARTS) {
    const segment = document.createElement("span");
    segment.className = part;
    segment.style.width = (batch.submitted ? (100 * batch[part]) / batch.submitted : 0) + "%";
    bar.append(segment);
  }
  const counts = document.createElement("p");
  counts.className = "counts";
  counts.textContent = `${batch.submitted} submitted: ${batch.done} done, ${batch.invalid} invalid, ` +
    `${batch.failed} failed, ${batch.running} running, ${batch.queued} queued, ${batch.duplicates} duplicates`;
  item.append(head, bar, counts);
  return item;
}

function noBatches() {
  const item = document.createElement("li");
  item.className = "empty";
  const code = document.createElement("code");
  code.textContent = "/coins";
  item.append("No batches yet: POST coin IDs to ", code, ".");
  return item;
}

function showBatches(batches) {
  const list = document.getElementById("batches");
  list.replaceChildren(...(batches.length ? batches.map(batchItem) : [noBatches()]));
}

// DELETE /coins starts the store afresh (a new generation, taskRuns from 1 again): the finished coins
// shown are gone, and the next ones are looked for from the start.
function followClears(health) {
  if (String(health.generation) === generation) return;
  generation = String(health.generation);
  lastTaskRun = 0;
  document.getElementById("latest").replaceChildren();
}

function showLatest(coins) {
  if (!coins.length) return;
  lastTaskRun = Math.max(lastTaskRun, ...coins.map((coin) => coin.taskRun));
  const list = document.getElementById("latest");
  for (const coin of coins.slice(-10)) {
    const item = document.createElement("li");
    const id = document.createElement("code");
    id.textContent = coin.id;
    item.append(id, ` #${coin.taskRun}: ${coin.exchanges.length} exchanges`);
    list.prepend(item);
  }
  while (list.children.length > 10) list.lastElementChild.remove();
}

async function refresh() {
  let busy = true;
  try {
    const health = await (await fetch("/healthz")).json();
    showHealth(health);
    followClears(health);
    const batches = await getJson("/batches");
    if (batches) showBatches(batches.batches);
    const latest = await getJson("/coins?since=" + lastTaskRun);
    if (latest) showLatest(latest.coins);
    busy = health.coins.queued + health.coins.running > 0 || health.worker.state !== "running";
  } catch (error) {
    busy = false;
  }
  setTimeout(refresh, busy ? BUSY_MS : IDLE_MS);
}

setTimeout(refresh, BUSY_MS);
