--- The iothub-jobs commands. Each takes a context { options, args, out, err, progress,
-- connect() } and returns an exit code (see iothub.cli.exitcodes).
-- @module iothub.cli.commands
local core = require "iothub.core"
local iothub = require "iothub"
local definitions = require "iothub.definitions"
local Rollout = require "iothub.rollout"
local exitcodes = require "iothub.cli.exitcodes"
local output = require "iothub.cli.output"
local args = require "iothub.cli.args"
local connection = require "iothub.cli.connection"

local M = {}

local WIRE_TYPES = { method = "scheduleDeviceMethod", twin = "scheduleUpdateTwin" }

-- Reports a client error and returns its exit code.
local function fail(ctx, err, hint)
  ctx.progress:close()
  ctx.err:write(args.PROGRAM, ": ", tostring(err), "\n")
  if hint then ctx.err:write(hint, "\n") end
  local unreachable = connection.unreachable_hint(ctx.conn, err)
  if unreachable then ctx.err:write(unreachable, "\n") end
  return exitcodes.for_error(err)
end

local function usage(ctx, message)
  local _, text = args.usage(args.BY_NAME[ctx.command], message)
  ctx.err:write(text, "\n")
  return exitcodes.USAGE
end

-- A Rollout wired to the context's progress output and Ctrl-C friendly sleep.
local function rollout(ctx, clients, extra)
  local o = ctx.options
  local opts = {
    jobs = clients.jobs, registry = clients.registry,
    interval = o.interval, timeout = o.timeout, sleep = ctx.sleep,
    maxActiveJobs = o["max-active-jobs"], maxConditionLength = o["max-condition-length"],
    onProgress = function(view, final) ctx.progress:update(view, final) end,
    onEvent = function(text) ctx.progress:note(text) end,
  }
  for k, v in pairs(extra or {}) do opts[k] = v end
  local r = Rollout.new(opts)
  ctx.rollout = r
  return r
end

local function timeout_hint(ids)
  return (#ids > 1 and "the jobs keep running on the hub; `" or "the job keeps running on the hub; `") ..
    args.PROGRAM .. " watch " .. table.concat(ids, " ") .. (#ids > 1 and "` watches them again" or "` watches it again")
end

-- Watches ids to the end; prints the outcome; returns the exit code.
local function watch_ids(ctx, clients, ids)
  local r = rollout(ctx, clients)
  local final, err = r:watch(ids)
  if not final then
    return fail(ctx, err, (err.kind == "timeout" or err.kind == "unavailable") and timeout_hint(ids) or nil)
  end
  local code = exitcodes.OK
  for _, job in ipairs(final.snapshots) do code = exitcodes.worst(code, exitcodes.for_job(job)) end
  if ctx.options.json then
    output.json(#final.snapshots == 1 and final.snapshots[1] or final.snapshots, ctx.out)
  else
    for _, job in ipairs(final.snapshots) do
      ctx.out:write(("%s: %s, %s\n"):format(job.jobId, tostring(job.status), output.stats_text(job.deviceJobStatistics)))
    end
  end
  return code
end

---------------------------------------------------------------------------

function M.create(ctx)
  local o, a = ctx.options, ctx.args
  local kind, method = a[1], a[2]
  if kind == "method" and not method then
    return usage(ctx, "give the method name: create method METHOD (e.g. create method lockDoor --device myDeviceId)")
  end
  if kind == "twin" and method then return usage(ctx, "unexpected argument '" .. method .. "' (twin jobs take --patch)") end
  if kind == "twin" then
    if o.patch == nil then return usage(ctx, "a twin job needs --patch, e.g. --patch '{\"desired\":{\"floor\":3}}'") end
    for _, f in ipairs({ "payload", "response-timeout", "connect-timeout" }) do
      if o[f] ~= nil then return usage(ctx, "--" .. f .. " belongs to method jobs, not twin jobs") end
    end
  elseif o.patch ~= nil then
    return usage(ctx, "--patch belongs to twin jobs; for a method job give --payload")
  end
  if (o.query ~= nil) == (o.device ~= nil) then
    return usage(ctx, "target the devices with --query CONDITION or --device ID (not both)")
  end
  local condition = o.query
  if o.device then
    for _, id in ipairs(o.device) do
      local ok, why = definitions.check_device_id(id)
      if not ok then return usage(ctx, "--device: " .. why) end
    end
    condition = Rollout.condition_for(o.device)
    if #condition > Rollout.MAX_CONDITION_LENGTH then
      return usage(ctx, ("%d device ids make a %d-character condition; the hub allows %d. Put them in a definitions " ..
        "file and use `run`, which splits them into several jobs"):format(#o.device, #condition, Rollout.MAX_CONDITION_LENGTH))
    end
  end
  local clients, code = ctx.connect()
  if not clients then return code end
  local id = o.id or iothub.uuid()
  local start = definitions.resolve_start(o.start, core.time())
  local job, err
  if kind == "method" then
    job, err = clients.jobs:scheduleDeviceMethod(id, condition, { methodName = method, payload = o.payload,
      responseTimeoutInSeconds = o["response-timeout"], connectTimeoutInSeconds = o["connect-timeout"] }, start, o.ttl)
  else
    job, err = clients.jobs:scheduleTwinUpdate(id, condition, o.patch, start, o.ttl)
  end
  if not job then return fail(ctx, err) end
  if o.watch then
    if not ctx.options.json then ctx.progress:note("created job " .. id) end
    return watch_ids(ctx, clients, { id })
  end
  if o.json then output.json(job, ctx.out) else ctx.out:write("created job ", id, " (", tostring(job.status), ")\n") end
  return exitcodes.OK
end

-- Prints what a paging iterator yields, up to `top` items: a JSON array with --json, else
-- the header and one row(item) line each. Nothing reaches stdout before the first page is
-- in, so a refused request prints only the error; a failure after some rows leaves the JSON
-- array unclosed, so a parser notices the list is incomplete. Returns the count, or nil and
-- the exit code of the error that stopped it.
local function print_rows(ctx, items, header, row, top)
  local json = ctx.options.json
  local item, err = items()
  if err then return nil, fail(ctx, err) end
  if json then ctx.out:write("[") else ctx.out:write(header, "\n") end
  local n = 0
  while item and not (top and n >= top) do
    n = n + 1
    if json then
      ctx.out:write(n > 1 and "," or "", assert(iothub.json.encode(item)))
    else
      ctx.out:write(row(item), "\n")
    end
    if not (top and n >= top) then
      item, err = items()
      if err then
        if json then ctx.out:write("\n") end
        ctx.out:flush()
        return nil, fail(ctx, err)
      end
    end
  end
  if json then ctx.out:write("]\n") end
  return n
end

function M.show(ctx)
  local clients, code = ctx.connect()
  if not clients then return code end
  local job, err = clients.jobs:getJob(ctx.args[1])
  if not job then return fail(ctx, err) end
  if ctx.options.json then output.json(job, ctx.out) else ctx.out:write(output.job_text(job)) end
  return exitcodes.OK
end

function M.list(ctx)
  local o = ctx.options
  local clients, code = ctx.connect()
  if not clients then return code end
  local filter = { type = WIRE_TYPES[o.type] or o.type, status = o.status }
  local shown, failed = print_rows(ctx, clients.jobs:queryJobs(filter), output.list_header(), output.list_row, o.top)
  return shown and exitcodes.OK or failed
end

function M.cancel(ctx)
  local clients, code = ctx.connect()
  if not clients then return code end
  local jobs = {}
  for _, id in ipairs(ctx.args) do
    local job, err = clients.jobs:cancelJob(id)
    if not job then return fail(ctx, err) end
    jobs[#jobs + 1] = job
    if not ctx.options.json then
      local note = job.status == "cancelled" and "" or " (it had already finished)"
      ctx.out:write(("%s: %s%s\n"):format(id, tostring(job.status), note))
    end
  end
  if ctx.options.json then output.json(#jobs == 1 and jobs[1] or jobs, ctx.out) end
  return exitcodes.OK
end

function M.watch(ctx)
  local clients, code = ctx.connect()
  if not clients then return code end
  return watch_ids(ctx, clients, ctx.args)
end

function M.devices(ctx)
  local o = ctx.options
  if o.failed and o.status and o.status ~= "failed" then
    return usage(ctx, "--failed and --status " .. o.status .. " contradict each other; give one")
  end
  local clients, code = ctx.connect()
  if not clients then return code end
  local id = ctx.args[1]
  -- The rows query is empty for an unknown id; say so instead of printing nothing.
  local job, err = clients.jobs:getJob(id)
  if not job then return fail(ctx, err) end
  local rows = clients.jobs:deviceJobs(id, { status = o.failed and "failed" or o.status })
  local n, failed = print_rows(ctx, rows, output.device_header(), output.device_row)
  if not n then return failed end
  if not o.json then
    ctx.out:write(("%d row(s) shown; job %s is %s: %s\n"):format(n, id, tostring(job.status),
      output.stats_text(job.deviceJobStatistics)))
  end
  return exitcodes.OK
end

-- Loads a definitions file and the --job selection; prints problems. Returns defs, only or nil, code.
local function load_definitions(ctx)
  local values = {}
  for kind, knob in pairs(core.sandbox_knobs) do values[kind] = ctx.options[knob.flag:sub(3)] end
  local limits, why = core.sandbox_limits(values, ctx.getenv)
  if not limits then return nil, usage(ctx, why) end
  local defs, problems = definitions.load(ctx.args[1], { limits = limits })
  if not defs then
    ctx.err:write(definitions.format(problems))
    ctx.err:write(("%s: %d problem(s) in %s; nothing was sent\n"):format(args.PROGRAM, #problems, ctx.args[1]))
    return nil, exitcodes.USAGE
  end
  local only
  if ctx.options.job then
    only = {}
    local names = {}
    for _, job in ipairs(defs.jobs) do names[job.name] = true end
    for _, name in ipairs(ctx.options.job) do
      if not names[name] then
        local list = {}
        for _, job in ipairs(defs.jobs) do list[#list + 1] = job.name end
        return nil, usage(ctx, "--job " .. name .. ": the file declares no such job (it has " .. table.concat(list, ", ") .. ")")
      end
      only[name] = true
    end
  end
  return defs, only
end

-- For plan and run: the loaded file, its --job selection and a connected Rollout.
-- Returns { defs=, only=, rollout= } or nil, exit code.
local function file_rollout(ctx)
  local defs, only = load_definitions(ctx)
  if not defs then return nil, only end
  local clients, code = ctx.connect()
  if not clients then return nil, code end
  return { defs = defs, only = only, rollout = rollout(ctx, clients) }
end

function M.plan(ctx)
  local file, code = file_rollout(ctx)
  if not file then return code end
  local plan, err = file.rollout:plan(file.defs, file.only)
  if not plan then return fail(ctx, err) end
  if ctx.options.json then output.json(output.plan_data(plan), ctx.out) else ctx.out:write(output.plan_text(plan)) end
  return exitcodes.OK
end

function M.run(ctx)
  local file, code = file_rollout(ctx)
  if not file then return code end
  local r = file.rollout
  local result, err = r:run(file.defs, file.only)
  ctx.progress:close()
  if not result then
    local unfinished = r:unfinished()
    local hint = #unfinished > 0 and ("these jobs keep running: " .. table.concat(unfinished, ", ") ..
      "; re-run `" .. args.PROGRAM .. " run " .. ctx.args[1] .. "` to resume") or nil
    return fail(ctx, err, hint)
  end
  if ctx.options.json then
    output.json(result, ctx.out)
  else
    ctx.out:write(output.result_text(result))
    if result.reason then ctx.out:write("rollout stopped: ", result.reason, "\n") end
  end
  return exitcodes.for_rollout(result)
end

return M
