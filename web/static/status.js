// Keeps the status page current without polling on a timer: it asks /coins?since=N&wait=S, which
// answers as soon as a coin lands (or after S seconds), then reads /healthz and /batches, with
// If-None-Match so that an unchanged answer costs a 304.
"use strict";

const WAIT_S = 5; // how long one round may wait for a coin to land
const ROUND_MS = 1000; // the shortest round, when coins land faster than that
const RETRY_MS = 5000; // after an error (the service restarting, or too many clients waiting)
const PARTS = ["done", "invalid", "failed", "running", "queued"];
const etags = {};
let lastTaskRun = Number(document.body.dataset.lastTaskRun || 0);
let generation = document.body.dataset.generation;

async function getJson(path) {
  const headers = { "X-Status-Page": "1" };
  if (etags[path]) headers["If-None-Match"] = etags[path];
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

// A sweep through the exchanges: a bar of the exchanges read while it runs, then its verification.
function showSweep(sweep) {
  const section = document.getElementById("sweep");
  section.hidden = !sweep;
  if (!sweep) return;
  const bar = document.getElementById("sweep-bar");
  if (sweep.running) {
    const eta = sweep.eta === null ? "paused" : "ETA " + Math.round(sweep.eta) + " s";
    text("sweep-text", `${sweep.done} of ${sweep.total} exchanges read, ${sweep.calls} calls, ${eta}`);
    bar.max = Math.max(1, sweep.total);
    bar.value = sweep.done;
  } else if (sweep.checked !== undefined) {
    const differed = sweep.differed.length ? ` (differed: ${sweep.differed.join(", ")})` : "";
    text("sweep-text", `Last sweep: ${sweep.agreed}/${sweep.checked} sampled coins agree with their own pages${differed}`);
    bar.max = 1;
    bar.value = 1;
  }
  const stopped = document.getElementById("sweep-stopped");
  stopped.hidden = !sweep.stopped;
  stopped.textContent = sweep.stopped || "";
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
  const started = Date.now();
  let delay = 0;
  try {
    const latest = await getJson("/coins?since=" + lastTaskRun + "&wait=" + WAIT_S);
    const health = await (await fetch("/healthz", { headers: { "X-Status-Page": "1" } })).json();
    showHealth(health);
    showSweep(health.sweep);
    followClears(health);
    if (latest) showLatest(latest.coins);
    const batches = await getJson("/batches");
    if (batches) showBatches(batches.batches);
    delay = Math.max(0, ROUND_MS - (Date.now() - started));
  } catch (error) {
    delay = RETRY_MS;
  }
  setTimeout(refresh, delay);
}

setTimeout(refresh, ROUND_MS);
