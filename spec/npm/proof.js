#!/usr/bin/env node
// Drives the real, unmodified `azure-iothub` npm package (Registry + JobClient) through
// the jobs flow and checks every answer against what the real IoT Hub service returns.
// Nothing here is tailored to the emulator: point IOTHUB_CONNECTION_STRING at a real hub
// (with a device PROOF_METHOD_DEVICE that answers PROOF_METHOD_NAME) and it runs the same.
//
//   IOTHUB_CONNECTION_STRING   HostName=...;SharedAccessKeyName=...;SharedAccessKey=... (required)
//   PROOF_METHOD_DEVICE        connected device that answers the method (default myDeviceId)
//   PROOF_METHOD_NAME          its method (default lockDoor)
//   PROOF_TIMEOUT_SECONDS      hard stop for the whole run (default 120)
//   PROOF_POLL_MS              job polling interval (default 500)
//
// Output: one "ok N - ..." / "not ok N - ..." line per step, then "proof: N passed, N failed"
// (plus ", N skipped" when a failure stopped the run). Exit status 0 only if every step passed.
'use strict';

const assert = require('assert/strict');
const crypto = require('crypto');
const { Registry, JobClient } = require('azure-iothub');

const connectionString = process.env.IOTHUB_CONNECTION_STRING;
const methodDevice = process.env.PROOF_METHOD_DEVICE || 'myDeviceId';
const methodName = process.env.PROOF_METHOD_NAME || 'lockDoor';
const timeoutSeconds = Number(process.env.PROOF_TIMEOUT_SECONDS || 120);
const pollMs = Number(process.env.PROOF_POLL_MS || 500);
const jobWaitMs = 60 * 1000;

const TERMINAL_JOB_STATES = ['completed', 'failed', 'cancelled'];

if (!connectionString) {
  console.error('proof.js: set IOTHUB_CONNECTION_STRING (HostName=...;SharedAccessKeyName=...;SharedAccessKey=...)');
  process.exit(2);
}

// One id per run, so reruns against a real hub never collide with earlier jobs or devices.
const runId = crypto.randomBytes(4).toString('hex');
const deviceId = `npm-proof-${runId}`;
const twinJobId = `npm-proof-twin-${runId}`;
const cancelJobId = `npm-proof-cancel-${runId}`;
const methodJobId = `npm-proof-method-${runId}`;

const registry = Registry.fromConnectionString(connectionString);
const jobClient = JobClient.fromConnectionString(connectionString);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const started = Date.now();
const elapsed = () => ((Date.now() - started) / 1000).toFixed(1) + ' s';

// An SDK error carries the HTTP response; show status, error code header and body so a
// failure says exactly what the service answered.
function describe(err) {
  if (!err) return String(err);
  let text = `${err.name || 'Error'}: ${err.message}`;
  if (err.response) {
    text += ` [HTTP ${err.response.statusCode}`;
    const code = err.response.headers && err.response.headers['iothub-errorcode'];
    if (code) text += ` iothub-errorcode=${code}`;
    text += ']';
  }
  if (err.responseBody) text += ` body=${String(err.responseBody).slice(0, 400)}`;
  return text;
}

// Polls getJob until the job reaches one of `states` (default: any terminal state).
async function waitForJob(jobId, states = TERMINAL_JOB_STATES) {
  const deadline = Date.now() + jobWaitMs;
  let job;
  for (;;) {
    ({ jobStatus: job } = await jobClient.getJob(jobId));
    if (states.includes(job.status)) return job;
    if (TERMINAL_JOB_STATES.includes(job.status)) {
      assert.fail(`job ${jobId} ended '${job.status}' while waiting for ${states.join('/')}: ` +
        `${job.failureReason || job.statusMessage || ''}`);
    }
    if (Date.now() > deadline) {
      assert.fail(`job ${jobId} still '${job.status}' after ${jobWaitMs / 1000} s`);
    }
    await sleep(pollMs);
  }
}

// Reads every page of a Query with next(), following x-ms-continuation until the service
// stops sending it (hasMoreResults false). Returns the items and the number of pages.
// The token is passed explicitly: in azure-iothub 1.16 the promise form next() with no
// argument drops query.continuationToken and fetches the first page again (only the
// callback form next(cb) reuses it).
async function readAllPages(query, maxPages = 1000) {
  const items = [];
  let pages = 0;
  while (query.hasMoreResults) {
    const { result } = await query.next(query.continuationToken);
    assert.ok(Array.isArray(result), `a query page must be a JSON array, got ${JSON.stringify(result)}`);
    items.push(...result);
    pages += 1;
    assert.ok(pages <= maxPages, `more than ${maxPages} pages: the continuation token never ends`);
  }
  return { items, pages };
}

async function deviceJobRows(jobId) {
  const sql = `SELECT * FROM devices.jobs WHERE devices.jobs.jobId = '${jobId}'`;
  const { items } = await readAllPages(registry.createQuery(sql, 100));
  return items;
}

const ISO_UTC = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$/;

const steps = [];
const step = (name, fn) => steps.push({ name, fn });
let deviceCreated = false;

step('Registry.create registers a device with generated SAS keys', async () => {
  const { responseBody: device, httpResponse } = await registry.create({ deviceId, status: 'enabled' });
  deviceCreated = true;
  assert.equal(httpResponse.statusCode, 200);
  assert.equal(device.deviceId, deviceId);
  assert.equal(device.status, 'enabled');
  assert.equal(device.authentication.type, 'sas');
  // The SDK sends empty keys; the service fills in two generated ones.
  const { primaryKey, secondaryKey } = device.authentication.symmetricKey;
  assert.match(primaryKey, /^[A-Za-z0-9+/]{40,}={0,2}$/, 'primaryKey generated');
  assert.match(secondaryKey, /^[A-Za-z0-9+/]{40,}={0,2}$/, 'secondaryKey generated');
  assert.notEqual(primaryKey, secondaryKey);
  assert.ok(device.etag, 'device etag');
  return `device ${deviceId}`;
});

step('Registry.create of the same id is refused with 409 DeviceAlreadyExists', async () => {
  await assert.rejects(registry.create({ deviceId }), (err) => {
    assert.equal(err.response && err.response.statusCode, 409, describe(err));
    assert.equal(err.constructor.name, 'DeviceAlreadyExistsError', describe(err));
    return true;
  });
});

step('Registry.get reads the device back', async () => {
  const { responseBody: device } = await registry.get(deviceId);
  assert.equal(device.deviceId, deviceId);
  assert.equal(device.status, 'enabled');
  assert.equal(device.connectionState, 'Disconnected');
  assert.ok(device.authentication.symmetricKey.primaryKey, 'keys are returned');
});

step('Registry.updateTwin merges tags and desired properties under the twin etag', async () => {
  const { responseBody: before } = await registry.getTwin(deviceId);
  assert.equal(before.deviceId, deviceId);
  assert.ok(before.etag, 'twin etag');
  const desiredVersion = before.properties.desired.$version;
  assert.equal(typeof desiredVersion, 'number', 'properties.desired.$version');

  const patch = { tags: { proof: { stage: 'twin', run: runId } }, properties: { desired: { telemetryInterval: 30 } } };
  const { responseBody: updated } = await registry.updateTwin(deviceId, patch, before.etag);
  assert.equal(updated.tags.proof.stage, 'twin');
  assert.notEqual(updated.etag, before.etag, 'the etag changes with the update');

  const { responseBody: after } = await registry.getTwin(deviceId);
  assert.deepEqual(after.tags.proof, { stage: 'twin', run: runId });
  assert.equal(after.properties.desired.telemetryInterval, 30);
  assert.ok(after.properties.desired.$version > desiredVersion, 'desired $version increases');

  // The old etag no longer matches: 412, which the SDK maps to InvalidEtagError.
  await assert.rejects(registry.updateTwin(deviceId, { tags: { stale: true } }, before.etag), (err) => {
    assert.equal(err.response && err.response.statusCode, 412, describe(err));
    assert.equal(err.constructor.name, 'InvalidEtagError', describe(err));
    return true;
  });
  return `etag ${before.etag} -> ${after.etag}`;
});

step('JobClient.scheduleTwinUpdate runs to completed and the tag lands on the twin', async () => {
  const patch = { etag: '*', tags: { proof: { stage: 'job', job: twinJobId } } };
  const { jobStatus: created } = await jobClient.scheduleTwinUpdate(twinJobId, `deviceId = '${deviceId}'`,
    patch, new Date(), 300);
  assert.equal(created.jobId, twinJobId);
  assert.equal(created.type, 'scheduleUpdateTwin');
  assert.ok(['queued', 'enqueued', 'scheduled', 'running', 'completed'].includes(created.status),
    `status right after create: ${created.status}`);

  const job = await waitForJob(twinJobId);
  assert.equal(job.status, 'completed', `twin job ended ${job.status}: ${job.failureReason || ''}`);
  assert.equal(job.queryCondition, `deviceId = '${deviceId}'`);
  assert.match(job.createdTime, ISO_UTC, 'createdTime');
  assert.match(job.startTime, ISO_UTC, 'startTime');
  assert.match(job.endTime, ISO_UTC, 'endTime');
  assert.equal(job.maxExecutionTimeInSeconds, 300);
  assert.equal(job.updateTwin.etag, '*');
  const stats = job.deviceJobStatistics;
  const statsText = `deviceJobStatistics ${JSON.stringify(stats)}`;
  assert.equal(stats.deviceCount, 1, statsText);
  assert.equal(stats.succeededCount, 1, statsText);
  assert.equal(stats.failedCount, 0, statsText);

  const { responseBody: twin } = await registry.getTwin(deviceId);
  // A twin job merges like PATCH /twins: the job's keys land, untouched keys stay.
  assert.deepEqual(twin.tags.proof, { stage: 'job', run: runId, job: twinJobId }, 'the job merged the tag');
  return `job ${twinJobId} completed`;
});

step('JobClient.scheduleDeviceMethod for later, then cancelJob: status cancelled', async () => {
  const startTime = new Date(Date.now() + 30 * 60 * 1000);
  const { jobStatus: created } = await jobClient.scheduleDeviceMethod(cancelJobId, `deviceId = '${deviceId}'`,
    { methodName, payload: { from: 'proof' }, responseTimeoutInSeconds: 15 }, startTime, 600);
  assert.equal(created.jobId, cancelJobId);
  assert.equal(created.type, 'scheduleDeviceMethod');
  assert.ok(['queued', 'enqueued', 'scheduled'].includes(created.status), `status right after create: ${created.status}`);

  // The hub moves a future job from queued to scheduled; cancel it there, as the az CLI tests do.
  const scheduled = await waitForJob(cancelJobId, ['scheduled']);
  assert.equal(scheduled.cloudToDeviceMethod.methodName, methodName);
  assert.equal(scheduled.cloudToDeviceMethod.responseTimeoutInSeconds, 15);
  assert.equal(Date.parse(scheduled.startTime), startTime.getTime(), 'startTime echoed');

  const { jobStatus: cancelling } = await jobClient.cancelJob(cancelJobId);
  assert.equal(cancelling.jobId, cancelJobId);
  // The job-level spelling is "cancelled" (two l); the reply may still say scheduled.
  assert.ok(['cancelled', 'scheduled'].includes(cancelling.status), `cancel answered ${cancelling.status}`);
  const job = await waitForJob(cancelJobId);
  assert.equal(job.status, 'cancelled');
  return `job ${cancelJobId} cancelled`;
});

step('JobClient.getJob of an unknown job id is not found', async () => {
  // Sources disagree on the service's answer: 404 (JobNotFound), or 200 with status
  // "unknown" (what the az CLI checks before falling back to v1 jobs). Either is "not found".
  let job;
  try {
    ({ jobStatus: job } = await jobClient.getJob(`npm-proof-missing-${runId}`));
  } catch (err) {
    assert.equal(err.response && err.response.statusCode, 404, describe(err));
    return `HTTP 404 ${err.response.headers['iothub-errorcode'] || ''}`.trim();
  }
  assert.equal(job && job.status, 'unknown', `an unknown job answered 200 ${JSON.stringify(job)}`);
  return 'HTTP 200 with status unknown';
});

step('JobClient.createQuery lists the jobs, one per page, following continuation tokens', async () => {
  const { items, pages } = await readAllPages(jobClient.createQuery(undefined, undefined, 1));
  const ids = items.map((j) => j.jobId);
  for (const id of [twinJobId, cancelJobId]) assert.ok(ids.includes(id), `job ${id} listed`);
  assert.equal(pages, items.length, 'page size 1 gives one job per page');
  for (const job of items) {
    assert.equal(typeof job.jobId, 'string');
    assert.ok(typeof job.type === 'string' && typeof job.status === 'string', JSON.stringify(job));
  }

  const { items: done } = await readAllPages(jobClient.createQuery('scheduleUpdateTwin', 'completed'));
  assert.ok(done.some((j) => j.jobId === twinJobId), 'filtered list has the twin job');
  for (const job of done) {
    assert.equal(job.type, 'scheduleUpdateTwin');
    assert.equal(job.status, 'completed');
  }

  const { items: cancelled } = await readAllPages(jobClient.createQuery('scheduleDeviceMethod', 'cancelled'));
  assert.ok(cancelled.some((j) => j.jobId === cancelJobId), 'filtered list has the cancelled job');
  assert.ok(!cancelled.some((j) => j.jobId === twinJobId), 'filters exclude other types');
  return `${items.length} job(s) in ${pages} page(s)`;
});

step('Registry.createQuery on devices.jobs returns the twin job\'s per-device row', async () => {
  const rows = await deviceJobRows(twinJobId);
  assert.equal(rows.length, 1, JSON.stringify(rows));
  const [row] = rows;
  const rowText = `device row ${JSON.stringify(row)}`;
  assert.equal(row.deviceId, deviceId, rowText);
  assert.equal(row.jobId, twinJobId, rowText);
  assert.equal(row.jobType, 'scheduleUpdateTwin', rowText);
  assert.equal(row.status, 'completed', rowText);
  assert.ok(row.createdDateTimeUtc && row.startTimeUtc && row.endTimeUtc && row.lastUpdatedDateTimeUtc,
    `row timestamps: ${JSON.stringify(row)}`);
});

step(`JobClient.scheduleDeviceMethod ${methodName} on ${methodDevice} completes with the device's response`, async () => {
  const { jobStatus: created } = await jobClient.scheduleDeviceMethod(methodJobId, `deviceId = '${methodDevice}'`,
    { methodName, payload: { force: true }, responseTimeoutInSeconds: 10 }, new Date(), 120);
  assert.equal(created.jobId, methodJobId);

  const job = await waitForJob(methodJobId);
  assert.equal(job.status, 'completed', `method job ended ${job.status}: ${job.failureReason || ''}`);
  const rows = await deviceJobRows(methodJobId);
  assert.equal(rows.length, 1, JSON.stringify(rows));
  const [row] = rows;
  const rowText = `device row ${JSON.stringify(row)}`;
  assert.equal(row.deviceId, methodDevice, rowText);
  assert.equal(row.jobType, 'scheduleDeviceMethod', rowText);
  assert.equal(row.status, 'completed', rowText);
  const statsText = `deviceJobStatistics ${JSON.stringify(job.deviceJobStatistics)}`;
  assert.equal(job.deviceJobStatistics.deviceCount, 1, statsText);
  assert.equal(job.deviceJobStatistics.succeededCount, 1, statsText);
  const response = row.outcome && row.outcome.deviceMethodResponse;
  assert.ok(response, `outcome.deviceMethodResponse: ${JSON.stringify(row)}`);
  assert.equal(response.status, 200);
  return `device answered ${JSON.stringify(response)}`;
});

step('Registry.delete removes the device; a later get is 404', async () => {
  const { httpResponse } = await registry.delete(deviceId);
  deviceCreated = false;
  assert.ok([200, 204].includes(httpResponse.statusCode), `delete answered ${httpResponse.statusCode}`);
  await assert.rejects(registry.get(deviceId), (err) => {
    assert.equal(err.response && err.response.statusCode, 404, describe(err));
    return true;
  });
});

function summary(passed, failed, skipped) {
  return `proof: ${passed} passed, ${failed} failed` + (skipped ? `, ${skipped} skipped` : '');
}

let passed = 0;
let failed = 0;

async function main() {
  const host = (/HostName=([^;]+)/i.exec(connectionString) || [])[1];
  console.log(`# azure-iothub ${require('azure-iothub/package.json').version} on node ${process.version}` +
    ` against https://${host} (run ${runId})`);
  for (let i = 0; i < steps.length; i++) {
    const { name, fn } = steps[i];
    const t0 = Date.now();
    try {
      const note = await fn();
      passed += 1;
      console.log(`ok ${i + 1} - ${name}${note ? ` (${note})` : ''} [${Date.now() - t0} ms]`);
    } catch (err) {
      failed += 1;
      console.log(`not ok ${i + 1} - ${name}`);
      console.log(`  # ${err instanceof assert.AssertionError ? err.message : describe(err)}`.replace(/\n/g, '\n  # '));
      // Later steps build on earlier ones: stop here, but do not leave the device behind.
      const skipped = steps.length - i - 1;
      for (let j = i + 1; j < steps.length; j++) console.log(`ok ${j + 1} - ${steps[j].name} # SKIP an earlier step failed`);
      if (deviceCreated) await registry.delete(deviceId).catch(() => {});
      console.log(summary(passed, failed, skipped));
      return 1;
    }
  }
  console.log(`# all steps passed in ${elapsed()}`);
  console.log(summary(passed, failed, 0));
  return 0;
}

// A hard stop, so a hung connection or a job that never finishes cannot hang CI.
setTimeout(() => {
  console.log(`not ok - the proof did not finish within ${timeoutSeconds} s`);
  console.log(summary(passed, failed + 1, Math.max(0, steps.length - passed - failed - 1)));
  process.exit(1);
}, timeoutSeconds * 1000).unref();

main().then((code) => process.exit(code), (err) => {
  console.log(`not ok - unexpected error: ${describe(err)}`);
  console.log(summary(passed, failed + 1, 0));
  process.exit(1);
});
