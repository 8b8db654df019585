--- What iothub-jobs prints on stdout: job summaries, tables, plans, and JSON for scripts
-- (the project's exact JSON codec, so integers stay integers).
-- @module iothub.cli.output
local core = require "iothub.core"
local json = require "iothub.json"

local M = {}

local null = core.null

local function present(v)
  return v ~= nil and v ~= null
end

--- Writes a value as one line of JSON.
function M.json(value, stream)
  stream = stream or io.stdout
  local text = assert(json.encode(value))
  stream:write(text, "\n")
end

local SHORT_TYPES = { scheduleDeviceMethod = "method", scheduleUpdateTwin = "twin" }
M.SHORT_TYPES = SHORT_TYPES

local function compact(value, limit)
  if not present(value) then return "null" end
  local text = json.encode(value) or tostring(value)
  limit = limit or 60
  if #text > limit then text = text:sub(1, limit - 3) .. "..." end
  return text
end
M.compact = compact

--- "12 succeeded, 1 failed, 0 running, 3 pending of 16".
function M.stats_text(stats)
  if type(stats) ~= "table" then return "no statistics yet" end
  return ("%d device(s): %d succeeded, %d failed, %d running, %d pending"):format(stats.deviceCount or 0,
    stats.succeededCount or 0, stats.failedCount or 0, stats.runningCount or 0, stats.pendingCount or 0)
end

--- A job as aligned "field  value" lines.
function M.job_text(job)
  local rows = { { "job", job.jobId } }
  local what = SHORT_TYPES[job.type] or tostring(job.type)
  if present(job.cloudToDeviceMethod) then
    local m = job.cloudToDeviceMethod
    what = what .. " " .. tostring(m.methodName) .. " payload " .. compact(m.payload) ..
      (present(m.responseTimeoutInSeconds) and (" (response timeout " .. m.responseTimeoutInSeconds .. " s)") or "")
  elseif present(job.updateTwin) then
    local patch = {}
    for k, v in pairs(job.updateTwin) do if k ~= "etag" then patch[k] = v end end
    what = what .. " " .. compact(patch)
  end
  rows[#rows + 1] = { "type", what }
  rows[#rows + 1] = { "status", tostring(job.status) ..
    (present(job.failureReason) and (" (" .. tostring(job.failureReason) .. ")") or "") }
  if present(job.queryCondition) then rows[#rows + 1] = { "condition", tostring(job.queryCondition) } end
  rows[#rows + 1] = { "devices", M.stats_text(job.deviceJobStatistics) }
  for _, f in ipairs({ { "created", "createdTime" }, { "start", "startTime" }, { "end", "endTime" } }) do
    local v = job[f[2]]
    if present(v) and not tostring(v):match("^9999") then rows[#rows + 1] = { f[1], tostring(v) } end
  end
  if present(job.maxExecutionTimeInSeconds) then rows[#rows + 1] = { "ttl", job.maxExecutionTimeInSeconds .. " s" } end
  local out = {}
  for _, r in ipairs(rows) do out[#out + 1] = ("%-10s %s"):format(r[1], r[2]) end
  return table.concat(out, "\n") .. "\n"
end

--- Fixed-width columns; the last column is free width.
function M.row(widths, values)
  local parts = {}
  for i, v in ipairs(values) do
    v = tostring(v)
    if widths[i] and i < #values then
      parts[#parts + 1] = #v >= widths[i] and (v .. " ") or (v .. (" "):rep(widths[i] - #v))
    else
      parts[#parts + 1] = v
    end
  end
  return (table.concat(parts, " "):gsub("%s+$", ""))
end

M.LIST_WIDTHS = { 36, 7, 10, 22 }
function M.list_header()
  return M.row(M.LIST_WIDTHS, { "JOB ID", "TYPE", "STATUS", "DEVICES ok/failed/all", "CREATED" })
end
function M.list_row(job)
  local s = type(job.deviceJobStatistics) == "table" and job.deviceJobStatistics or {}
  return M.row(M.LIST_WIDTHS, { job.jobId, SHORT_TYPES[job.type] or tostring(job.type), tostring(job.status),
    ("%d/%d/%d"):format(s.succeededCount or 0, s.failedCount or 0, s.deviceCount or 0),
    present(job.createdTime) and job.createdTime or "" })
end

M.DEVICE_WIDTHS = { 24, 10 }
function M.device_header()
  return M.row(M.DEVICE_WIDTHS, { "DEVICE", "STATUS", "RESULT" })
end
--- One device row of devices.jobs: its status and the method's answer or the error.
function M.device_row(row)
  local result = ""
  local response = type(row.outcome) == "table" and row.outcome.deviceMethodResponse
  if present(row.error) and type(row.error) == "table" then
    result = tostring(row.error.code) .. ": " .. tostring(row.error.description)
  elseif present(response) and type(response) == "table" then
    result = "method returned " .. tostring(response.status) .. " " .. compact(response.payload)
  end
  return M.row(M.DEVICE_WIDTHS, { row.deviceId, tostring(row.status), result })
end

local function gate_text(gate)
  if not gate then return "no gate" end
  local parts = {}
  if gate.minSuccessRatio then parts[#parts + 1] = ("success >= %g%%"):format(gate.minSuccessRatio * 100) end
  if gate.maxFailures then parts[#parts + 1] = ("failures <= %d"):format(gate.maxFailures) end
  if #parts == 0 then return "no gate" end
  return "gate: " .. table.concat(parts, ", ")
end
M.gate_text = gate_text

local function preview(ids, n)
  if not ids or #ids == 0 then return "" end
  local shown = {}
  for i = 1, math.min(n, #ids) do shown[i] = ids[i] end
  return table.concat(shown, ", ") .. (#ids > n and (", ... (" .. (#ids - n) .. " more)") or "")
end

--- The plan (iothub.rollout plan()) as text: per job and stage, the device counts and every
-- request exactly as it would be sent.
function M.plan_text(plan)
  local out = {}
  local function add(s) out[#out + 1] = s end
  add("Plan for " .. tostring(plan.file) .. " (nothing has been sent; `run` does this):")
  for _, entry in ipairs(plan.jobs) do
    local job = entry.job
    add("")
    local what = job.type == "method" and ("direct method " .. job.methodParams.methodName) or "twin update"
    local target = job.query and ("query " .. job.query) or (#job.devices .. " listed device(s)")
    add(("job %s: %s, %s, ttl %d s"):format(job.name, what, target, job.ttl))
    if job.description then add("  " .. job.description) end
    if job.devices then
      add(("  targets now: %d device(s) exist of %d listed"):format(entry.devices, #job.devices))
    elseif entry.devices then
      add(("  targets now: %d device(s) match"):format(entry.devices))
    else
      add("  targets now: not counted (the condition is too long to count with a query)")
    end
    if entry.uncovered and entry.uncovered > 0 then
      add(("  note: the last stage reaches only part of the targets; %d device(s) are left out"):format(entry.uncovered))
    end
    local n_stages = #entry.stages
    for k, stage in ipairs(entry.stages) do
      if n_stages > 1 or job.stages then
        local share = stage.count and ("up to " .. stage.count .. " device(s)") or
          (stage.percent and ("up to " .. stage.percent .. "%") or "")
        add(("  stage %d/%d%s: %d device(s) (%s), %s%s"):format(k, n_stages, stage.name and (" '" .. stage.name .. "'") or "",
          stage.ids and #stage.ids or 0, share, gate_text(stage.gate),
          stage.ids and #stage.ids > 0 and (": " .. preview(stage.ids, 5)) or ""))
      end
      if #stage.requests == 0 then add("    (adds no devices: skipped)") end
      if k > 1 and #stage.requests > 0 then
        add("    (starts when stage " .. (k - 1) .. "'s gate passes; its startTime is then)")
      end
      for _, req in ipairs(stage.requests) do
        local existing = req.existing and (" -- exists already (" .. tostring(req.existing.status) ..
          "); run adopts it") or ""
        local matched = req.devices and (req.devices .. " device(s) match now") or ("not counted: " .. req.uncounted)
        add(("    %s %s  [%s%s]%s"):format(req.method, req.path, matched,
          req.listed and (" of " .. req.listed .. " listed") or "", existing))
        add("    " .. req.body)
      end
    end
  end
  return table.concat(out, "\n") .. "\n"
end

--- The plan as JSON-ready data.
function M.plan_data(plan)
  local jobs = {}
  for _, entry in ipairs(plan.jobs) do
    local job = entry.job
    local stages = {}
    for k, stage in ipairs(entry.stages) do
      local requests = {}
      for i, req in ipairs(stage.requests) do
        requests[i] = { jobId = req.jobId, method = req.method, path = req.path, body = json.decode(req.body),
          devices = req.devices, uncounted = req.uncounted, listed = req.listed,
          existing = req.existing and { status = req.existing.status } or nil }
      end
      stages[k] = { index = k, name = stage.name, count = stage.count, percent = stage.percent, gate = stage.gate,
        devices = stage.ids and #stage.ids or nil, requests = requests }
    end
    jobs[#jobs + 1] = { name = job.name, type = job.type, hash = job.hash, targets = entry.targets,
      devices = entry.devices, uncovered = entry.uncovered, stages = stages }
  end
  return { file = plan.file, jobs = jobs }
end

--- A run result (iothub.rollout run()) as text.
function M.result_text(result)
  local out = {}
  for _, jr in ipairs(result.jobs) do
    out[#out + 1] = ("job %s: %s%s"):format(jr.name, jr.status:gsub("_", " "), jr.reason and (" -- " .. jr.reason) or "")
    for _, sr in ipairs(jr.stages) do
      local totals = sr.totals
      local text = sr.skipped and sr.skipped or
        (totals and ("%d succeeded, %d failed of %d"):format(totals.succeededCount, totals.failedCount, totals.deviceCount)
          or "not run")
      local ids = {}
      for _, j in ipairs(sr.jobs) do ids[#ids + 1] = tostring(j.jobId) .. " " .. tostring(j.status) end
      local gate = sr.gate and sr.gateResult and (sr.gateResult.passed and "; gate passed" or "; gate FAILED") or ""
      local jobs_text = #ids > 0 and (" [" .. table.concat(ids, ", ") .. "]") or ""
      if #jr.stages == 1 and not sr.gate then
        out[#out + 1] = "  " .. text .. jobs_text
      else
        out[#out + 1] = ("  stage %d%s: %s%s%s"):format(sr.index, sr.name and (" '" .. sr.name .. "'") or "", text,
          gate, jobs_text)
      end
    end
  end
  return table.concat(out, "\n") .. "\n"
end

return M
