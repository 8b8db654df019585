-- An injected clock: sleeping advances time instantly and is recorded, so retry and monitor
-- behaviour can be checked without waiting.
local FakeClock = {}
FakeClock.__index = FakeClock

function FakeClock.new(epoch)
  local self = setmetatable({ t = 0, epoch = epoch or 1700000000, sleeps = {} }, FakeClock)
  self.now = function() return self.t end
  self.time = function() return self.epoch + self.t end
  self.sleep = function(s)
    self.sleeps[#self.sleeps + 1] = s
    self.t = self.t + s
  end
  return self
end

function FakeClock:advance(s)
  self.t = self.t + s
end

function FakeClock:total_slept()
  local sum = 0
  for _, s in ipairs(self.sleeps) do sum = sum + s end
  return sum
end

return FakeClock
