local core = require "iothub.core"

local function contains(s, sub) return s:find(sub, 1, true) ~= nil end

describe("monotime and time", function()
  it("monotime never goes backwards", function()
    local prev = core.monotime()
    for _ = 1, 1000 do
      local now = core.monotime()
      assert.is_true(now >= prev)
      prev = now
    end
  end)

  it("time is wall-clock seconds with a fraction", function()
    local t = core.time()
    assert.is_true(math.abs(t - os.time()) < 2)
    local fractional = false
    for _ = 1, 20 do
      local x = core.time()
      if x ~= math.floor(x) then fractional = true break end
      core.sleep(0.001)
    end
    assert.is_true(fractional)
  end)
end)

describe("sleep", function()
  it("sleeps about the requested time and returns true", function()
    local t0 = core.monotime()
    assert.is_true(core.sleep(0.05))
    local dt = core.monotime() - t0
    assert.is_true(dt >= 0.045, "slept " .. dt)
    assert.is_true(dt < 1, "slept " .. dt)
  end)

  it("returns at once for zero or negative durations", function()
    local t0 = core.monotime()
    assert.is_true(core.sleep(0))
    assert.is_true(core.sleep(-5))
    assert.is_true(core.monotime() - t0 < 0.01)
  end)

  it("raises for a non-number", function()
    assert.has_error(function() core.sleep("soon") end)
  end)
end)

describe("format_time", function()
  it("formats like JavaScript's toISOString", function()
    assert.equal("1970-01-01T00:00:00.000Z", core.format_time(0))
    assert.equal("2023-11-14T22:13:20.000Z", core.format_time(1700000000))
    assert.equal("2000-02-29T12:00:00.000Z", core.format_time(951825600))
    assert.equal("2023-01-01T00:00:00.123Z", core.format_time(1672531200.123))
  end)

  it("truncates to milliseconds instead of rounding", function()
    assert.equal("1970-01-01T00:00:01.999Z", core.format_time(1.9996))
    assert.equal("2023-01-01T00:00:00.999Z", core.format_time(1672531200.9999))
  end)

  it("handles times before 1970", function()
    assert.equal("1969-12-31T23:59:59.500Z", core.format_time(-0.5))
    assert.equal("1900-01-01T00:00:00.000Z", core.format_time(-2208988800))
  end)

  it("returns InvalidTime outside years 0000-9999 and for NaN", function()
    for _, bad in ipairs({ 1e20, -1e20, 253402300800, 0 / 0, math.huge }) do
      local s, msg, code = core.format_time(bad)
      assert.is_nil(s)
      assert.equal("InvalidTime", code)
      assert.is_string(msg)
    end
    assert.equal("9999-12-31T23:59:59.000Z", core.format_time(253402300799))
  end)

  it("raises for a non-number", function()
    assert.has_error(function() core.format_time("now") end)
  end)
end)

describe("parse_time", function()
  local function near(expected, actual, tol)
    assert.is_number(actual)
    assert.is_true(math.abs(expected - actual) <= (tol or 1e-6), ("expected %.7f got %.7f"):format(expected, actual))
  end

  it("parses UTC timestamps with Z", function()
    assert.equal(1700000000, core.parse_time("2023-11-14T22:13:20Z"))
    assert.equal(0, core.parse_time("1970-01-01T00:00:00Z"))
    assert.equal(1700000000, core.parse_time("2023-11-14t22:13:20z"))
  end)

  it("keeps the fractional part, up to 7 and more digits", function()
    near(1672531200.123, core.parse_time("2023-01-01T00:00:00.123Z"))
    near(1672531200.1234567, core.parse_time("2023-01-01T00:00:00.1234567Z"))
    near(1672531200.5, core.parse_time("2023-01-01T00:00:00.5Z"))
    near(1672531200.123456789, core.parse_time("2023-01-01T00:00:00.123456789012Z"))
  end)

  it("applies zone offsets", function()
    assert.equal(1700000000 - 2 * 3600, core.parse_time("2023-11-14T22:13:20+02:00"))
    assert.equal(1700000000 + 5 * 3600 + 30 * 60, core.parse_time("2023-11-14T22:13:20-05:30"))
    assert.equal(1700000000, core.parse_time("2023-11-14T22:13:20+00:00"))
  end)

  it("treats a time without zone as UTC (device-job rows omit the Z)", function()
    near(1700000000.25, core.parse_time("2023-11-14T22:13:20.25"))
  end)

  it("accepts a space instead of T, and a bare date as midnight UTC", function()
    assert.equal(1700000000, core.parse_time("2023-11-14 22:13:20Z"))
    assert.equal(1699920000, core.parse_time("2023-11-14"))
    assert.equal(951782400, core.parse_time("2000-02-29"))
  end)

  it("round-trips with format_time at millisecond precision", function()
    for _, s in ipairs({ "2023-01-01T00:00:00.123Z", "1999-12-31T23:59:59.999Z", "2024-02-29T12:34:56.001Z",
      "1969-07-20T20:17:40.000Z" }) do
      assert.equal(s, core.format_time(core.parse_time(s)))
    end
  end)

  it("rejects invalid calendar dates and times with the expected format", function()
    local cases = {
      ["2023-02-29"] = "February 2023 has no day 29",
      ["2023-04-31T00:00:00Z"] = "no day 31",
      ["2023-13-01"] = "month",
      ["2023-00-10"] = "month",
      ["2023-01-00"] = "no day 0",
      ["2023-01-01T24:00:00Z"] = "hour",
      ["2023-01-01T00:60:00Z"] = "minutes",
      ["2023-01-01T00:00:60Z"] = "seconds",
      ["2023-01-01T00:00:00+24:00"] = "offset",
      ["2023-01-01T00:00:00+0200"] = "offset",
      ["2023-1-1"] = "YYYY-MM-DD",
      ["2023-01-01T00:00"] = "HH:MM:SS",
      ["2023-01-01T00:00:00."] = "fraction",
      ["2023-01-01T00:00:00Zjunk"] = "unexpected",
      ["2023-01-01X00:00:00"] = "'T'",
      ["2023-01-01T00:00:00 UTC"] = "unexpected",
      ["next tuesday"] = "YYYY-MM-DD",
      [""] = "YYYY-MM-DD",
    }
    for input, want in pairs(cases) do
      local v, msg, code = core.parse_time(input)
      assert.is_nil(v, input)
      assert.equal("InvalidTime", code)
      assert.truthy(contains(msg, want), msg)
      assert.truthy(contains(msg, "expected YYYY-MM-DDTHH:MM:SS"), msg)
    end
  end)

  it("raises for a non-string", function()
    assert.has_error(function() core.parse_time({}) end)
  end)
end)

describe("process helpers", function()
  it("isatty returns a boolean and false for invalid descriptors", function()
    assert.is_boolean(core.isatty(0))
    assert.is_false(core.isatty(-1))
    assert.is_false(core.isatty(987654))
  end)

  it("cputime grows with work", function()
    local c0 = core.cputime()
    assert.is_true(c0 >= 0)
    local t0, x = core.monotime(), 0
    while core.monotime() - t0 < 0.1 do x = x + 1 end
    assert.is_true(core.cputime() - c0 > 0.02)
  end)

  it("maxrss reports a plausible peak in KiB", function()
    local kib = core.maxrss()
    assert.is_true(kib > 100 and kib < 64 * 1024 * 1024, tostring(kib))
  end)
end)
