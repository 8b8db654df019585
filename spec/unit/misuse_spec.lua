-- Misuse raises, and the message's position is the caller's line, however deep inside the
-- library the check runs (and through pcall, whose C frame is skipped). The calls below are
-- not tail calls: a tail call removes the frame that would be blamed.
local iothub = require "iothub"
local support = require "support.client"

local THIS_FILE = "misuse_spec%.lua"

-- Runs fn under pcall and returns the message and the line number it names.
local function raised(fn)
  local ok, msg = pcall(fn)
  assert.is_false(ok, "expected a raised error")
  local line = tonumber(msg:match(THIS_FILE .. ":(%d+):"))
  return msg, line
end

local function line_of_caller()
  return debug.getinfo(2, "l").currentline
end

describe("misuse errors", function()
  local jobs = support.make(iothub.JobClient, {})
  local registry = support.make(iothub.Registry, {})

  it("blames the caller's line for a wrong jobId type in scheduleDeviceMethod", function()
    local expected = line_of_caller() + 1
    local msg, line = raised(function() local _ = jobs:scheduleDeviceMethod(42, "*", { methodName = "m" }) end)
    assert.matches("jobId must be a string, got number", msg, 1, true)
    assert.equal(expected, line)
  end)

  it("blames the caller's line for a wrong jobId type in getJob", function()
    local expected = line_of_caller() + 1
    local msg, line = raised(function() local _ = jobs:getJob({}) end)
    assert.matches("jobId must be a string, got table", msg, 1, true)
    assert.equal(expected, line)
  end)

  it("blames the caller's line for a wrong startTime type", function()
    local expected = line_of_caller() + 1
    local msg, line = raised(function() local _ = jobs:scheduleTwinUpdate("j1", "*", { tags = {} }, true) end)
    assert.matches("startTime must be nil, epoch seconds or an ISO-8601 string", msg, 1, true)
    assert.equal(expected, line)
  end)

  it("blames the caller's line for a bad monitor option", function()
    local expected = line_of_caller() + 1
    local msg, line = raised(function() local _ = jobs:monitorJob("j1", { intervall = 1 }) end)
    assert.matches("unknown monitor option 'intervall'", msg, 1, true)
    assert.equal(expected, line)
  end)

  it("blames the caller's line for an unknown client option", function()
    local expected = line_of_caller() + 1
    local msg, line = raised(function() local _ = iothub.JobClient.fromConnectionString(support.CS, { endpont = "x" }) end)
    assert.matches("unknown option 'endpont'", msg, 1, true)
    assert.equal(expected, line)
  end)

  it("blames the caller's line for a non-string connection string", function()
    local expected = line_of_caller() + 1
    local msg, line = raised(function() local _ = iothub.Registry.fromConnectionString(nil) end)
    assert.matches("connection string must be a string, got nil", msg, 1, true)
    assert.equal(expected, line)
  end)

  it("blames the caller's line for a wrong deviceId type in the registry", function()
    local expected = line_of_caller() + 1
    local msg, line = raised(function() local _ = registry:getTwin(7) end)
    assert.matches("deviceId must be a string, got number", msg, 1, true)
    assert.equal(expected, line)
  end)

  it("skips the C frame of a direct pcall", function()
    local ok, msg = pcall(jobs.getJob, jobs, 5)
    assert.is_false(ok)
    -- No Lua caller outside the library: the position is this function's pcall line or none,
    -- never a line inside lua/iothub/.
    assert.is_nil(msg:find("iothub/jobs%.lua"))
  end)
end)
