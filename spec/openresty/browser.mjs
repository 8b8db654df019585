// Drives the OpenResty dashboard in Debian's headless Chromium:
//   node spec/openresty/browser.mjs <dashboard URL> <screenshot.png>
// Schedules a direct-method job and a twin job from the form, waits for each to reach
// "completed" with its counts and per-device outcomes, and saves a screenshot. Prints one
// PASS/FAIL line per check (counted by spec/openresty/run.sh); exits non-zero on failure.
import { chromium } from "playwright-core";

const [url, screenshot] = process.argv.slice(2);
if (!url || !screenshot) {
  console.error("usage: node browser.mjs <dashboard URL> <screenshot.png>");
  process.exit(2);
}

let failures = 0;
async function check(name, fn) {
  try {
    console.log(`PASS browser ${name}: ${await fn()}`);
  } catch (e) {
    failures++;
    console.log(`FAIL browser ${name}: ${String(e.message || e).split("\n")[0]}`);
  }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
page.setDefaultTimeout(30000);
// Script errors, and HTTP failures other than the one bad form we submit on purpose.
const consoleErrors = [];
let expectRefusal = false;
page.on("pageerror", (e) => consoleErrors.push(e.message));
page.on("console", (m) => {
  if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) consoleErrors.push(m.text());
});
page.on("response", (r) => {
  if (r.status() < 400) return;
  const refusal = expectRefusal && r.status() === 400 && r.request().method() === "POST";
  if (!refusal) consoleErrors.push(`HTTP ${r.status()} for ${r.request().method()} ${r.url()}`);
});

// Submits the form and returns the id the page reports, then waits for its row to say
// "completed" with the expected counts.
async function scheduleAndWatch(kind, fields, counts) {
  await page.check(`input[name=type][value=${kind}]`);
  for (const [name, value] of Object.entries(fields)) await page.fill(`input[name=${name}]`, value);
  const started = Date.now();
  await page.click("button[type=submit]");
  const message = page.locator("#form-message.ok");
  await message.waitFor();
  const jobId = (await message.textContent()).replace(/^scheduled /, "").trim();
  if (!jobId) throw new Error("the page reported no job id");
  const row = page.locator(`tr[data-job-id="${jobId}"]`);
  await row.locator(".status.completed").waitFor();
  const text = await row.locator(".counts").textContent();
  if (text !== counts) throw new Error(`row counts '${text}', want '${counts}'`);
  return { jobId, seconds: (Date.now() - started) / 1000, text };
}

await page.goto(url);
await check("page loads and polls", async () => {
  await page.locator("#poll-status", { hasText: "hub polled" }).waitFor();
  return await page.locator("#poll-status").textContent();
});

await check("method job from the form reaches completed", async () => {
  const r = await scheduleAndWatch("method", {
    queryCondition: "deviceId IN ['myDeviceId','door-001','door-basement']",
    methodName: "lockDoor", payload: '{"force": true}', responseTimeoutInSeconds: "10",
  }, "2 succeeded, 1 failed of 3");
  // Per-device outcomes for the job the page selected.
  await page.locator('#device-rows tr[data-device-id="door-basement"] .status.failed').waitFor();
  await page.locator('#device-rows tr[data-device-id="myDeviceId"] .status.completed').waitFor();
  const outcome = await page.locator('#device-rows tr[data-device-id="myDeviceId"] td:nth-child(3)').textContent();
  if (!outcome.includes("method answered 200")) throw new Error(`myDeviceId outcome '${outcome}'`);
  const failed = await page.locator('#device-rows tr[data-device-id="door-basement"] td:nth-child(3)').textContent();
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
  const msg = await page.locator("#form-message.error").textContent();
  expectRefusal = false;
  if (!/SELECT/i.test(msg)) throw new Error(`message '${msg}'`);
  await page.fill("input[name=queryCondition]", "tags.location.building = '43'");
  return msg;
});

await check("screenshot saved", async () => {
  // Show the method job's devices in the shot.
  await page.locator("tr.job", { hasText: "method lockDoor" }).first().click();
  await page.locator('#device-rows tr[data-device-id="door-basement"]').waitFor();
  await page.screenshot({ path: screenshot, fullPage: true });
  return screenshot;
});

await check("no script errors or failed requests in the page", async () => {
  if (consoleErrors.length) throw new Error(consoleErrors.join(" | "));
  return "none";
});

await browser.close();
process.exit(failures ? 1 : 0);
