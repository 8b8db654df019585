// The dashboard page: polls the JSON endpoints (which only read nginx's shared dict) once a
// second, renders the jobs and the selected job's device outcomes, and posts the form.
"use strict";

const $ = (sel) => document.querySelector(sel);
let selectedJob = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "className") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function countsText(s) {
  if (!s) return "";
  const parts = [`${s.succeededCount || 0} succeeded`, `${s.failedCount || 0} failed`];
  if (s.runningCount) parts.push(`${s.runningCount} running`);
  if (s.pendingCount) parts.push(`${s.pendingCount} pending`);
  return `${parts.join(", ")} of ${s.deviceCount || 0}`;
}

function progressBar(s) {
  const bar = el("div", { className: "bar" });
  const total = (s && s.deviceCount) || 0;
  if (total > 0) {
    bar.append(el("div", { className: "ok", style: `width:${(100 * (s.succeededCount || 0)) / total}%` }));
    bar.append(el("div", { className: "bad", style: `width:${(100 * (s.failedCount || 0)) / total}%` }));
  }
  return bar;
}

// Hub times are UTC; device rows' start/end times come without the "Z".
function shortTime(iso) {
  if (!iso || iso.startsWith("9999")) return "";
  const d = new Date(/[Zz]$|[+-]\d\d:\d\d$/.test(iso) ? iso : iso + "Z");
  return isNaN(d) ? iso : d.toLocaleTimeString();
}

function jobKind(job) {
  if (job.type === "scheduleDeviceMethod") {
    return `method ${(job.cloudToDeviceMethod && job.cloudToDeviceMethod.methodName) || ""}`.trim();
  }
  return job.type === "scheduleUpdateTwin" ? "twin update" : job.type;
}

const ACTIVE = new Set(["queued", "enqueued", "scheduled", "running"]);

function renderJobs(data) {
  const body = $("#job-rows");
  body.replaceChildren();
  if (!data.jobs.length) {
    body.append(el("tr", { className: "empty" }, el("td", { colSpan: 6 }, "No jobs yet.")));
  }
  for (const job of data.jobs) {
    const stats = job.deviceJobStatistics;
    const cancel = ACTIVE.has(job.status)
      ? el("button", { type: "button", className: "cancel", onclick: (e) => { e.stopPropagation(); cancelJob(job.jobId); } }, "Cancel")
      : "";
    const row = el("tr", { className: "job" + (job.jobId === selectedJob ? " selected" : ""), "data-job-id": job.jobId },
      el("td", {}, job.jobId),
      el("td", {}, jobKind(job)),
      el("td", {}, el("span", { className: `status ${job.status}` }, job.status),
        job.failureReason ? el("div", { className: "muted" }, job.failureReason) : ""),
      el("td", {}, progressBar(stats), el("span", { className: "counts" }, countsText(stats))),
      el("td", {}, shortTime(job.createdTime)),
      el("td", {}, cancel));
    row.addEventListener("click", () => { selectedJob = job.jobId; refresh(); });
    body.append(row);
  }
  const poll = data.poll;
  const status = $("#poll-status");
  if (!poll) status.textContent = "waiting for the first poll…";
  else if (poll.ok) status.textContent = `hub polled ${Math.max(0, data.now - poll.at).toFixed(1)} s ago`;
  else status.textContent = `hub poll failed: ${poll.error}`;
}

function outcomeText(row) {
  if (row.error && row.error.code) return `${row.error.code}: ${row.error.description || ""}`;
  const res = row.outcome && row.outcome.deviceMethodResponse;
  if (res && res.status !== undefined) return `method answered ${res.status} ${JSON.stringify(res.payload)}`;
  return row.status === "completed" ? "twin updated" : "";
}

function renderDevices(data) {
  $("#devices").hidden = false;
  $("#devices-job").textContent = data.jobId;
  const body = $("#device-rows");
  body.replaceChildren();
  for (const row of data.devices) {
    body.append(el("tr", { "data-device-id": row.deviceId },
      el("td", {}, row.deviceId),
      el("td", {}, el("span", { className: `status ${row.status}` }, row.status)),
      el("td", {}, outcomeText(row)),
      el("td", {}, shortTime(row.lastUpdatedDateTimeUtc))));
  }
  if (!data.devices.length) body.append(el("tr", {}, el("td", { colSpan: 4, className: "muted" }, "No device rows yet.")));
}

async function getJSON(url, options) {
  // A hung connection must not stall the page: the next tick asks again.
  const res = await fetch(url, { signal: AbortSignal.timeout(10000), ...options });
  const body = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
  return body;
}

// Refreshes overlap when the server is slow (the 1 s timer, a submit, a click): an answer
// older than the one already shown is dropped, and device rows only show for the job that
// is still selected.
let refreshes = 0;
let shownJobs = 0;
let shownDevices = 0;

async function refresh() {
  const seq = ++refreshes;
  try {
    const jobs = await getJSON("/api/jobs");
    if (seq > shownJobs) {
      shownJobs = seq;
      renderJobs(jobs);
    }
    const wanted = selectedJob;
    if (!wanted) return;
    const devices = await getJSON(`/api/jobs/${encodeURIComponent(wanted)}/devices`);
    if (seq > shownDevices && wanted === selectedJob) {
      shownDevices = seq;
      renderDevices(devices);
    }
  } catch (e) {
    $("#poll-status").textContent = `dashboard unreachable: ${e.message}`;
  }
}

async function cancelJob(id) {
  try {
    await getJSON(`/api/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
  } catch (e) {
    showMessage(`cancel failed: ${e.message}`, "error");
  }
  refresh();
}

// kind: "busy" while the request is out, then "ok" (scheduled) or "error".
function showMessage(text, kind) {
  const msg = $("#form-message");
  msg.textContent = text;
  msg.className = kind;
}

function formType() {
  return $("#job-form").querySelector("input[name=type]:checked").value;
}

function syncKind() {
  const twin = formType() === "twin";
  $(".method-only").hidden = twin;
  $(".twin-only").hidden = !twin;
}

$("#job-form").addEventListener("change", syncKind);
$("#job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const type = formType();
  const body = { type, queryCondition: form.get("queryCondition"), jobId: form.get("jobId") };
  if (type === "method") {
    Object.assign(body, { methodName: form.get("methodName"), payload: form.get("payload"),
      responseTimeoutInSeconds: Number(form.get("responseTimeoutInSeconds")) });
  } else {
    Object.assign(body, { tags: form.get("tags"), desired: form.get("desired") });
  }
  showMessage("scheduling…", "busy");
  try {
    const { job } = await getJSON("/api/jobs", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    selectedJob = job.jobId;
    showMessage(`scheduled ${job.jobId}`, "ok");
    event.target.elements.jobId.value = "";
  } catch (e) {
    showMessage(e.message, "error");
  }
  refresh();
});

syncKind();
refresh();
setInterval(refresh, 1000);
