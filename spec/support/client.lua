-- Builds a client wired to a recording transport and an injected clock, for unit specs.
local iothub = require "iothub"
local Recorder = require "support.recording_transport"
local FakeClock = require "support.fake_clock"

local M = {}

-- The reference's test key: base64("password").
M.CS = "HostName=myhub.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=cGFzc3dvcmQ="

--- class: iothub.JobClient or iothub.Registry; script: the recorder's responses;
-- opts: client options overriding the test defaults; epoch: the fake clock's wall time at 0.
-- Returns client, recorder, clock.
function M.make(class, script, opts, epoch)
  local clock = FakeClock.new(epoch or 1700000000)
  local rec = Recorder.new(script)
  local o = { transport = rec, clock = clock, sleep = clock.sleep, random = function() return 0 end }
  for k, v in pairs(opts or {}) do o[k] = v end
  return assert(class.fromConnectionString(M.CS, o)), rec, clock
end

M.iothub = iothub
return M
