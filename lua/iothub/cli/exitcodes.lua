--- Exit codes of the iothub-jobs command, and how outcomes and errors map to them.
-- @module iothub.cli.exitcodes
local M = {
  OK = 0,              -- every job completed and every device succeeded; or the command did what was asked
  JOB_FAILED = 1,      -- a job failed or was cancelled
  USAGE = 2,           -- bad arguments or definitions file; nothing was sent
  DEVICES_FAILED = 3,  -- a job completed but some devices failed, or a rollout gate stopped the rollout
  AUTH = 4,            -- the hub refused the credentials (401/403), or they are malformed
  NETWORK = 5,         -- the hub could not be reached (DNS, connect, TLS)
  TIMEOUT = 6,         -- --timeout passed while watching (the job keeps running), or a request timed out
  SERVICE = 7,         -- the hub refused a request (job not found, invalid request, conflict, throttled)
  INTERNAL = 70,       -- a bug in iothub-jobs
  INTERRUPTED = 130,   -- Ctrl-C (SIGINT); jobs keep running on the hub
}

--- The documented table, for --help and the README.
M.TABLE = {
  { M.OK, "success: every job completed and every device succeeded (or the command did what was asked)" },
  { M.JOB_FAILED, "a job failed or was cancelled" },
  { M.USAGE, "usage: bad arguments or definitions file (nothing was sent)" },
  { M.DEVICES_FAILED, "some devices failed (a job completed with failures, or a rollout gate stopped the rollout)" },
  { M.AUTH, "authentication: the hub refused the credentials, or the connection string is malformed" },
  { M.NETWORK, "network: the hub could not be reached (DNS, connection, TLS)" },
  { M.TIMEOUT, "timeout: --timeout passed while watching (the job keeps running), or a request timed out" },
  { M.SERVICE, "the hub refused a request (e.g. job not found, invalid request, conflict, still throttled)" },
  { M.INTERRUPTED, "interrupted (Ctrl-C); jobs already created keep running on the hub" },
}

--- The exit code for a client error (see iothub.errors).
function M.for_error(err)
  if type(err) ~= "table" then return M.INTERNAL end
  if err.kind == "invalid_argument" then
    if err.code == "InvalidConnectionString" or err.code == "InvalidToken" then return M.AUTH end
    return M.USAGE
  end
  -- a monitor that stopped on a failing hub: what the hub's last failure was
  if err.kind == "unavailable" and type(err.lastError) == "table" then return M.for_error(err.lastError) end
  if err.kind == "auth" or err.status == 401 or err.status == 403 then return M.AUTH end
  if err.kind == "timeout" or err.code == "MonitorTimeout" then return M.TIMEOUT end
  if err.kind == "network" or err.kind == "tls" then return M.NETWORK end
  return M.SERVICE
end

--- The exit code a finished job's snapshot stands for.
function M.for_job(job)
  if type(job) ~= "table" then return M.INTERNAL end
  if job.status == "failed" or job.status == "cancelled" then return M.JOB_FAILED end
  local s = job.deviceJobStatistics
  if type(s) == "table" and (tonumber(s.failedCount) or 0) > 0 then return M.DEVICES_FAILED end
  return M.OK
end

-- Which of two outcome codes wins when several jobs are reported together.
local RANK = { [M.OK] = 0, [M.DEVICES_FAILED] = 1, [M.JOB_FAILED] = 2 }
function M.worst(a, b)
  if (RANK[b] or 3) > (RANK[a] or 3) then return b end
  return a
end

--- The exit code of a rollout result (iothub.rollout run()).
function M.for_rollout(result)
  local status = result and result.status
  if status == "succeeded" then return M.OK end
  if status == "job_failed" then return M.JOB_FAILED end
  if status == "gate_failed" or status == "completed_with_failures" then return M.DEVICES_FAILED end
  return M.INTERNAL
end

return M
