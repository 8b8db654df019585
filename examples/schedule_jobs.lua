-- The seed tutorial ("Schedule and broadcast jobs", scheduleJobService.js) in Lua: schedule a
-- job that calls lockDoor on a device and a job that sets desired properties, monitor both
-- at once, then print their final state and every device's result.
--
-- Against the local emulator:  make demo
-- Against a real hub:          IOTHUB_CONNECTION_STRING='HostName=...;SharedAccessKeyName=...;SharedAccessKey=...' \
--                                IOTHUB_DEVICE_ID=myDeviceId lua5.4 examples/schedule_jobs.lua
-- Optional: IOTHUB_ENDPOINT (e.g. https://localhost:8443) and IOTHUB_CA_FILE for a private CA.
local iothub = require "iothub"
local json = iothub.json

local connectionString = os.getenv("IOTHUB_CONNECTION_STRING")
if not connectionString or connectionString == "" then
  io.stderr:write("set IOTHUB_CONNECTION_STRING (make demo does this for the local emulator)\n")
  os.exit(2)
end
local options = { endpoint = os.getenv("IOTHUB_ENDPOINT"), caFile = os.getenv("IOTHUB_CA_FILE") }
local deviceArray = { os.getenv("IOTHUB_DEVICE_ID") or "myDeviceId" }
local startTime = nil -- now
local maxExecutionTimeInSeconds = 3600

local jobClient = assert(iothub.JobClient.fromConnectionString(connectionString, options))

-- The tutorial passed a device array; the service takes a WHERE clause.
local quoted = {}
for i, id in ipairs(deviceArray) do quoted[i] = "'" .. id .. "'" end
local queryCondition = "deviceId IN [" .. table.concat(quoted, ",") .. "]"

local methodParams = {
  methodName = "lockDoor",
  payload = iothub.null,
  responseTimeoutInSeconds = 15, -- time out after 15 seconds if the device cannot process the method
}
local methodJobId = iothub.uuid()
print("scheduling Device Method job with id: " .. methodJobId)
local _, err = jobClient:scheduleDeviceMethod(methodJobId, queryCondition, methodParams, startTime,
  maxExecutionTimeInSeconds)
if err then
  io.stderr:write("Could not schedule device method job: " .. tostring(err) .. "\n")
  os.exit(1)
end

local twinPatch = {
  etag = "*",
  properties = { desired = { building = "43", floor = 3 } },
}
local twinJobId = iothub.uuid()
print("scheduling Twin Update job with id: " .. twinJobId)
_, err = jobClient:scheduleTwinUpdate(twinJobId, queryCondition, twinPatch, startTime, maxExecutionTimeInSeconds)
if err then
  io.stderr:write("Could not schedule twin update job: " .. tostring(err) .. "\n")
  os.exit(1)
end

-- Monitor both jobs concurrently: each monitor is a task; their polls share one curl multi handle.
local scheduler = iothub.Scheduler.new()
local function monitor(jobId)
  return jobClient:monitorJob(jobId, {
    interval = tonumber(os.getenv("IOTHUB_POLL_INTERVAL")) or 1,
    timeout = 300,
    onProgress = function(job) print("Job: " .. jobId .. " - status: " .. job.status) end,
  })
end
local tasks = { scheduler:spawn(monitor, methodJobId), scheduler:spawn(monitor, twinJobId) }
assert(scheduler:run())

local failures = 0
for i, jobId in ipairs({ methodJobId, twinJobId }) do
  local job, monitorErr = tasks[i].results[1], tasks[i].results[2]
  if not job then
    io.stderr:write("Could not monitor job " .. jobId .. ": " .. tostring(monitorErr) .. "\n")
    failures = failures + 1
  else
    print(json.encode(job))
    if job.status ~= "completed" then failures = failures + 1 end
    for row, rowErr in jobClient:deviceJobs(jobId) do
      if not row then
        io.stderr:write("Could not read device results: " .. tostring(rowErr) .. "\n")
        failures = failures + 1
        break
      end
      local outcome = row.outcome and row.outcome.deviceMethodResponse
      local detail = outcome and outcome ~= iothub.null and ("method returned " .. tostring(outcome.status))
        or (row.error and row.error ~= iothub.null and (row.error.code .. ": " .. row.error.description))
        or ""
      print(("  device %-12s %-10s %s"):format(row.deviceId, row.status, detail))
      if row.status ~= "completed" then failures = failures + 1 end
    end
  end
end
os.exit(failures == 0 and 0 or 1)
