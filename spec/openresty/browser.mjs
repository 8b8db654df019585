// Drives the OpenResty dashboard in Debian's headless Chromium:
//   node spec/openresty/browser.mjs <dashboard URL> <screenshot.png>
// Schedules a direct-method job and a twin job from the form, waits for each to reach
// "completed" with its counts and per-device outcomes, and saves a screenshot. Prints one
// PASS/FAIL line per check (counted by spec/openresty/run.sh); exits non-zero on failure.
// A FAIL line names the wait that timed out; indented lines after it show what the page
// showed, the last /api answers it got and what the dashboard answers now.
import { chromium } from "playwright-core";

const [url, screenshot] = process.argv.slice(2);
if (!url || !screenshot) {
  console.error("usage: node browser.mjs <dashboard URL> <screenshot.png>");
  process.exit(2);
}

const WAIT_MS = 30000; // jobs finish in about a second; this is headroom for a loaded machine
// Scheduling answers are held back this long, as on a loaded machine, so every run takes the
// path where the form message still says "scheduling…" while the checks look at it.
const SLOW_POST_MS = 300;
const BODY_CHARS = 1500;

const started = Date.now();
const clock = () => `+${((Date.now() - started) / 1000).toFixed(1)} s`;
const clip = (text) => (text.length > BODY_CHARS ? `${text.slice(0, BODY_CHARS)}… (${text.length} chars)` : text);
const oneLine = (text) => String(text).replace(/\s+/g, " ").trim();

let jobInFocus = null; // the job the running check is about, for the failure dump

let failures = 0;
async function check(name, fn) {
  try {
    console.log(`PASS browser ${name}: ${await fn()}`);
  } catch (e) {
    failures++;
    console.log(`FAIL browser ${name}: ${String(e.message || e).split("\n")[0]}`);
    for (const line of await pageState()) console.log(`    | ${line}`);
  } finally {
    jobInFocus = null;
  }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
page.setDefaultTimeout(WAIT_MS);
await page.route("**/api/jobs", async (route) => {
  if (route.request().method() === "POST") await new Promise((r) => setTimeout(r, SLOW_POST_MS));
  await route.continue();
});

// Script errors, and HTTP failures other than the one bad form we submit on purpose.
const consoleErrors = [];
let expectRefusal = false;
page.on("pageerror", (e) => consoleErrors.push(e.message));
page.on("console", (m) => {
  if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) consoleErrors.push(m.text());
});
// The last answer the page got for each kind of /api request, for the failure dump.
const lastAnswers = new Map();
page.on("response", async (r) => {
  const method = r.request().method();
  if (r.status() >= 400) {
    const refusal = expectRefusal && r.status() === 400 && method === "POST";
    if (!refusal) consoleErrors.push(`HTTP ${r.status()} for ${method} ${r.url()}`);
  }
  const path = new URL(r.url()).pathname;
  if (!path.startsWith("/api/")) return;
  const at = clock();
  const body = await r.text().catch((e) => `(body unavailable: ${e.message})`);
  const kind = `${method} ${path.replace(/^\/api\/jobs\/[^/]+\//, "/api/jobs/{id}/")}`;
  lastAnswers.set(kind, `${method} ${path} ${r.status()} at ${at}: ${clip(body)}`);
});

// locator.waitFor with a label: a timeout says what was awaited.
async function waitFor(label, locator) {
  try {
    await locator.waitFor();
  } catch (e) {
    if (e.name !== "TimeoutError") throw e;
    throw new Error(`timed out after ${WAIT_MS / 1000} s waiting for ${label} [${locator}]`);
  }
}

// What the page shows and what the dashboard answers, as lines; never throws.
async function pageState() {
  const lines = [`at ${clock()}, page ${page.url()}`];
  const text = async (locator) => oneLine(await locator.textContent({ timeout: 1000 }));
  const attempt = async (label, fn) => {
    try { lines.push(`${label}: ${await fn()}`); } catch (e) { lines.push(`${label}: (${oneLine(e.message).slice(0, 200)})`); }
  };
  await attempt("form message", async () => {
    const msg = page.locator("#form-message");
    return `'${await text(msg)}' (class '${await msg.getAttribute("class", { timeout: 1000 })}')`;
  });
  await attempt("poll status", () => text(page.locator("#poll-status")));
  // Table rows as "cell | cell | …", rows separated by " || ".
  const rows = async (selector) => (await page.locator(selector).evaluateAll((trs) =>
    trs.map((tr) => [...tr.cells].map((td) => td.textContent.replace(/\s+/g, " ").trim()).join(" | ")))).join(" || ");
  if (jobInFocus) {
    await attempt(`row of ${jobInFocus}`, async () => (await rows(`tr[data-job-id="${jobInFocus}"]`)) || "no such row in the page");
  }
  await attempt("job rows", () => rows("#job-rows tr"));
  await attempt("devices section", async () => {
    if (await page.locator("#devices").isHidden()) return "hidden";
    return `job '${await text(page.locator("#devices-job"))}': ${await rows("#device-rows tr")}`;
  });
  for (const answer of lastAnswers.values()) lines.push(`page got ${answer}`);
  // The dashboard's view right now, fetched outside the page.
  const paths = ["/api/jobs", ...(jobInFocus ? [`/api/jobs/${encodeURIComponent(jobInFocus)}/devices`] : [])];
  for (const path of paths) {
    await attempt(`dashboard now GET ${path}`, async () => {
      const res = await fetch(new URL(path, url), { signal: AbortSignal.timeout(5000) });
      return `${res.status}: ${clip(await res.text())}`;
    });
  }
  return lines;
}

// Submits the form, takes the job id from the page's message once the answer is in, then
// waits for the job's row to say "completed" with the expected counts.
async function scheduleAndWatch(kind, fields, counts) {
  await page.check(`input[name=type][value=${kind}]`);
  for (const [name, value] of Object.entries(fields)) await page.fill(`input[name=${name}]`, value);
  const t0 = Date.now();
  await page.click("button[type=submit]");
  const message = page.locator("#form-message.ok", { hasText: /^scheduled \S+$/ });
  await waitFor("the form message 'scheduled <job id>'", message);
  const jobId = (await message.textContent()).replace(/^scheduled /, "").trim();
  jobInFocus = jobId;
  const row = page.locator(`tr[data-job-id="${jobId}"]`);
  await waitFor(`job ${jobId}'s row to show status completed`, row.locator(".status.completed"));
  const text = await row.locator(".counts").textContent();
  if (text !== counts) throw new Error(`row counts '${text}', want '${counts}'`);
  return { jobId, seconds: (Date.now() - t0) / 1000, text };
}

await page.goto(url);
await check("page loads and polls", async () => {
  await waitFor("the poll status 'hub polled'", page.locator("#poll-status", { hasText: "hub polled" }));
  return await page.locator("#poll-status").textContent();
});

await check("method job from the form reaches completed", async () => {
  const r = await scheduleAndWatch("method", {
    queryCondition: "deviceId IN ['myDeviceId','door-001','door-basement']",
    methodName: "lockDoor", payload: '{"force": true}', responseTimeoutInSeconds: "10",
  }, "2 succeeded, 1 failed of 3");
  // Per-device outcomes for the job the page selected.
  const device = (id) => page.locator(`#device-rows tr[data-device-id="${id}"]`);
  await waitFor("device row door-basement with status failed", device("door-basement").locator(".status.failed"));
  await waitFor("device row myDeviceId with status completed", device("myDeviceId").locator(".status.completed"));
  const outcome = await device("myDeviceId").locator("td:nth-child(3)").textContent();
  if (!outcome.includes("method answered 200")) throw new Error(`myDeviceId outcome '${outcome}'`);
  const failed = await device("door-basement").locator("td:nth-child(3)").textContent();
  if (!failed.includes("DeviceNotOnline")) throw new Error(`door-basement outcome '${failed}'`);
  return `${r.jobId}: ${r.text} in ${r.seconds.toFixed(1)} s; device rows: myDeviceId ${outcome}; door-basement ${failed}`;
});

await check("twin job from the form reaches completed", async () => {
  const r = await scheduleAndWatch("twin", {
    queryCondition: "deviceId IN ['myDeviceId','door-002']",
    tags: '{"maintenance": "browser-test"}', desired: '{"firmware": "9.9.9"}',
  }, "2 succeeded, 0 failed of 2");
  return `${r.jobId}: ${r.text} in ${r.seconds.toFixed(1)} s`;
});

await check("a bad form is refused with the reason", async () => {
  await page.check("input[name=type][value=method]");
  await page.fill("input[name=queryCondition]", "SELECT * FROM devices");
  expectRefusal = true;
  await page.click("button[type=submit]");
  const error = page.locator("#form-message.error");
  await waitFor("the form's error message", error);
  const msg = await error.textContent();
  expectRefusal = false;
  if (!/SELECT/i.test(msg)) throw new Error(`message '${msg}'`);
  await page.fill("input[name=queryCondition]", "tags.location.building = '43'");
  return msg;
});

await check("screenshot saved", async () => {
  // Show the method job's devices in the shot.
  await page.locator("tr.job", { hasText: "method lockDoor" }).first().click();
  await waitFor("device row door-basement of the clicked method job",
    page.locator('#device-rows tr[data-device-id="door-basement"]'));
  await page.screenshot({ path: screenshot, fullPage: true });
  return screenshot;
});

await check("no script errors or failed requests in the page", async () => {
  if (consoleErrors.length) throw new Error(consoleErrors.join(" | "));
  return "none";
});

await browser.close();
process.exit(failures ? 1 : 0);
