-- The iothub-jobs command line, end to end: bin/iothub-jobs runs as a subprocess (under the
-- interpreter running this spec) against a real bin/iothub-emulator loaded with the
-- tutorial's devices (examples/devices.lua) and the rollout fleet (examples/fleet-devices.lua).
-- "Sends nothing" is proved with the emulator's own access log. A pty (util-linux `script`)
-- shows the progress bar and Ctrl-C.
--   busted --lua=lua5.4 spec/e2e/cli_spec.lua
local core = require "iothub.core"
local shell = require "support.shell"
local emulator_process = require "support.emulator_process"
local sh_quote, run, read_file, write_file = shell.quote, shell.run, shell.read_file, shell.write_file

local LUA = jit and "luajit" or "lua5.4"
local ROOT = shell.ROOT

local HAS_SCRIPT = (run("command -v script"))

-- Both example devices files in one: each is a chunk that returns { devices=, fleets= }.
local function combined_devices()
  local parts = {}
  for i, name in ipairs({ "devices.lua", "fleet-devices.lua" }) do
    parts[i] = "local part" .. i .. " = (function()\n" .. assert(read_file(ROOT .. "/examples/" .. name)) .. "\nend)()"
  end
  return table.concat(parts, "\n") .. [[

local out = { devices = {}, fleets = {} }
for _, part in ipairs({ part1, part2 }) do
  for _, d in ipairs(part.devices or {}) do out.devices[#out.devices + 1] = d end
  for _, f in ipairs(part.fleets or {}) do out.fleets[#out.fleets + 1] = f end
end
return out
]]
end

describe("iothub-jobs", function()
  local emu = emulator_process.shared({ devices_source = combined_devices(), https = true,
    args = { "--job-rate", "200" }, ready_timeout = 15 })
  local E -- the --emulator=DIR option
  lazy_setup(function() E = "--emulator=" .. sh_quote(emu.dir) end)

  -- Runs bin/iothub-jobs with a clean environment (plus env); returns rc, stdout, stderr.
  local function cli(args, env)
    local out, err = emu.tmp .. "/cli.out", emu.tmp .. "/cli.err"
    local prefix = "env -u IOTHUB_CONNECTION_STRING -u IOTHUB_ENDPOINT -u IOTHUB_CA_FILE -u IOTHUB_EMULATOR_DIR"
    for k, v in pairs(env or {}) do prefix = prefix .. " " .. k .. "=" .. sh_quote(v) end
    local _, _, rc = run("(cd " .. sh_quote(ROOT) .. " && " .. prefix .. " " .. LUA .. " bin/iothub-jobs " .. args
      .. " >" .. sh_quote(out) .. " 2>" .. sh_quote(err) .. " </dev/null)")
    return rc, read_file(out) or "", read_file(err) or ""
  end

  local function tmpfile(name, text)
    local path = emu.tmp .. "/" .. name
    write_file(path, text)
    return path
  end

  describe("help and usage", function()
    it("has --help for every command, and an overview with the exit codes", function()
      local rc, out = cli("--help")
      assert.equal(0, rc)
      assert.matches("Usage: iothub%-jobs COMMAND", out)
      assert.matches("130  interrupted", out)
      for _, command in ipairs({ "create", "show", "list", "cancel", "watch", "devices", "plan", "run" }) do
        rc, out = cli(command .. " --help")
        assert.equal(0, rc, command)
        assert.matches("^Usage: iothub%-jobs " .. command, out)
        assert.matches("%-%-emulator", out)
        local rc2, out2 = cli("help " .. command)
        assert.equal(0, rc2)
        assert.equal(out, out2)
      end
    end)

    it("prints the usage to stderr and exits 2 when no command is given", function()
      local rc, out, err = cli("")
      assert.equal(2, rc)
      assert.equal("", out)
      assert.matches("^Usage: iothub%-jobs COMMAND", err)
      assert.matches("130  interrupted", err)
    end)

    it("refuses bad command lines with exit 2, says what to fix, and sends nothing", function()
      local before = emu:requests_served()
      local cases = {
        { "creat", "unknown command 'creat'; did you mean 'create'?" },
        { "list --stauts running " .. E, "unknown option '--stauts'; did you mean '--status'?" },
        { "list --status canceled " .. E, "did you mean 'cancelled'?" },
        { "show " .. E, "missing JOBID" },
        { "show a b " .. E, "unexpected argument 'b'" },
        { "create method " .. E .. " --query '*'", "give the method name" },
        { "create method m --query '*' --device d " .. E, "--query CONDITION or --device ID (not both)" },
        { "create method m --device 'bad id' " .. E, "has a character IoT Hub does not allow" },
        { "create method m --device d --ttl 10x " .. E, "--ttl: '10x' is not a duration" },
        { "create method m --device d --payload '{force:true}' " .. E, "--payload: the value is not valid JSON" },
        { "create method m --device d --payload @/nonexistent.json " .. E, "cannot read /nonexistent.json" },
        { "create twin --device d " .. E, "a twin job needs --patch" },
        { "create method m --query 'SELECT * FROM devices' " .. E, "not a full SELECT query" },
        { "create method m --device d --response-timeout 1 " .. E, "from 5 to 300" },
        { "create method m --device d", "no hub to talk to" },
        { "show x --emulator=/nonexistent/dir", "no such directory or file" },
        { "plan examples " .. E, "examples: is a directory; give the definitions file in it" },
      }
      for _, case in ipairs(cases) do
        local rc, _, err = cli(case[1])
        assert.equal(2, rc, case[1] .. ": " .. err)
        assert.truthy(err:find(case[2], 1, true), case[1] .. " said: " .. err)
      end
      assert.equal(before, emu:requests_served())
    end)
  end)

  describe("connection", function()
    it("reads the emulator's --dir, its start-up output, the environment, or HTTPS with --ca-file", function()
      assert.equal(0, (cli("list " .. E)))
      assert.equal(0, (cli("list --emulator=" .. sh_quote(emu.out))))
      assert.equal(0, (cli("list --emulator", { IOTHUB_EMULATOR_DIR = emu.dir })))
      local cs = emu:output():match("IOTHUB_CONNECTION_STRING=([^\n]+)")
      assert.equal(0, (cli("list", { IOTHUB_CONNECTION_STRING = cs, IOTHUB_ENDPOINT = "http://127.0.0.1:" .. emu.http_port })))
      assert.equal(0, (cli("list -c " .. sh_quote(cs) .. " --endpoint https://localhost:" .. emu.https_port
        .. " --ca-file " .. sh_quote(emu.dir .. "/certs/ca.pem"))))
      -- without the CA, HTTPS fails as a network (TLS) error
      local rc = cli("list -c " .. sh_quote(cs) .. " --endpoint https://localhost:" .. emu.https_port, { SSL_CERT_FILE = "/dev/null" })
      assert.equal(5, rc)
    end)

    it("exits 4 when the hub refuses the key (never printing it, nor a list on stdout), 5 when it cannot be reached",
      function()
      local wrong = core.base64_encode("a wrong key of thirty-two bytes!")
      local bad_key = "-c 'HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey=" .. wrong
        .. "' --endpoint http://127.0.0.1:" .. emu.http_port
      for _, json in ipairs({ "", " --json" }) do
        local rc, out, err = cli("list " .. bad_key .. json)
        assert.equal(4, rc)
        assert.equal("", out) -- neither "[]" nor a table header: a script must not read an empty list
        assert.matches("401", err)
        assert.falsy((out .. err):find(wrong, 1, true))
      end
      local rc, out, err = cli("show x --emulator --endpoint http://127.0.0.1:9")
      assert.equal("", out)
      assert.equal(5, rc)
      assert.matches("iothub%-jobs: ", err)
    end)

    it("reports an emulator that is not running within a second, and says what to check", function()
      -- nothing listens on port 9 of this machine
      local started = core.monotime()
      local rc, out, err = cli("show x --emulator --endpoint http://127.0.0.1:9")
      assert.equal(5, rc)
      assert.equal("", out)
      assert.is_true(core.monotime() - started < 3, "took " .. (core.monotime() - started) .. " s")
      assert.matches("is bin/iothub%-emulator running at http://127%.0%.0%.1:9%? %(bare %-%-emulator means", err)
      -- the --dir of a stopped emulator: its nginx.conf is still there, its connection file is not
      local dir = emu.tmp .. "/stopped"
      assert(run("mkdir -p " .. sh_quote(dir)))
      write_file(dir .. "/nginx.conf", 'host = "localhost"\nkey = "' .. emulator_process.KEY .. '"\n'
        .. "listen 127.0.0.1:9;\n")
      started = core.monotime()
      rc, out, err = cli("list --emulator=" .. sh_quote(dir))
      assert.equal(5, rc)
      assert.equal("", out)
      assert.is_true(core.monotime() - started < 3, "took " .. (core.monotime() - started) .. " s")
      assert.truthy(err:find("is bin/iothub-emulator running at http://127.0.0.1:9? (" .. dir .. "/connection is missing: "
        .. "start it with bin/iothub-emulator --dir " .. dir .. ")", 1, true), err)
    end)
  end)

  describe("jobs", function()
    it("creates a method job on listed devices and watches it: 0 when every device succeeded", function()
      local rc, out, err = cli("create method lockDoor --device myDeviceId,door-001 --device door-002 --payload "
        .. "'{\"force\":true}' --response-timeout 15 --id cli-lock-ok --watch --interval 0.2 " .. E)
      assert.equal(0, rc, err)
      assert.matches("cli%-lock%-ok: completed, 3 device%(s%): 3 succeeded, 0 failed", out)
      rc, out = cli("show cli-lock-ok --json " .. E)
      assert.equal(0, rc)
      local job = core.json_decode(out)
      assert.equal("deviceId IN ['myDeviceId','door-001','door-002']", job.queryCondition)
      assert.same({ force = true }, job.cloudToDeviceMethod.payload)
      assert.equal(15, job.cloudToDeviceMethod.responseTimeoutInSeconds)
    end)

    it("exits 3 when some devices failed; devices shows each device, --failed only the failures", function()
      local rc, out = cli("create method lockDoor --device myDeviceId,door-basement --id cli-lock-some --watch "
        .. "--interval 0.2 " .. E)
      assert.equal(3, rc)
      assert.matches("1 succeeded, 1 failed", out)
      rc, out = cli("devices cli-lock-some " .. E)
      assert.equal(0, rc)
      assert.matches("DEVICE%s+STATUS%s+RESULT", out)
      assert.matches("myDeviceId%s+completed%s+method returned 200 {\"locked\":true}", out)
      assert.matches("door%-basement%s+failed%s+DeviceNotOnline: ", out)
      rc, out = cli("devices cli-lock-some --failed --json " .. E)
      assert.equal(0, rc)
      local rows = core.json_decode(out)
      assert.equal(1, #rows)
      assert.equal("door-basement", rows[1].deviceId)
      assert.equal("DeviceNotOnline", rows[1].error.code)
    end)

    it("creates a twin job from a patch file and shows it", function()
      local patch = tmpfile("patch.json", '{"desired":{"building":"43","floor":3}}')
      local rc, out, err = cli("create twin --query \"deviceId = 'myDeviceId'\" --patch @" .. sh_quote(patch)
        .. " --ttl 10m --json " .. E)
      assert.equal(0, rc, err)
      local job = core.json_decode(out)
      assert.equal("scheduleUpdateTwin", job.type)
      assert.equal(600, job.maxExecutionTimeInSeconds)
      assert.same({ building = "43", floor = 3 }, job.updateTwin.properties.desired)
      rc = cli("watch " .. job.jobId .. " --interval 0.2 --quiet " .. E)
      assert.equal(0, rc)
      rc, out = cli("show " .. job.jobId .. " " .. E)
      assert.equal(0, rc)
      assert.matches("type%s+twin {\"properties\":{\"desired\":{\"building\":\"43\",\"floor\":3}}}", out)
      assert.matches("status%s+completed", out)
      assert.matches("ttl%s+600 s", out)
    end)

    it("schedules for later, times out watching (6), cancels, and watching a cancelled job exits 1", function()
      local rc, out = cli("create method lockDoor --device door-003 --start +1h --id cli-later " .. E)
      assert.equal(0, rc)
      assert.matches("created job cli%-later", out)
      local err
      rc, out, err = cli("watch cli-later --timeout 1 --interval 0.2 " .. E)
      assert.equal("", out)
      assert.equal(6, rc)
      assert.matches("did not finish within 1 s", err)
      assert.matches("keeps running on the hub", err)
      rc, out = cli("cancel cli-later " .. E)
      assert.equal(0, rc)
      assert.matches("cli%-later: cancelled", out)
      rc = cli("watch cli-later --interval 0.2 " .. E)
      assert.equal(1, rc)
    end)

    it("watches jobs that exist with their own status, never 'creating'", function()
      assert.equal(0, (cli("create method lockDoor --device door-004 --id cli-watch-a --watch --quiet --interval 0.2 " .. E)))
      assert.equal(0, (cli("create method lockDoor --device door-002 --start +1h --id cli-watch-b " .. E)))
      local rc, _, err = cli("watch cli-watch-a cli-watch-b --timeout 1 --interval 0.2 " .. E)
      assert.equal(6, rc)
      assert.matches("%] 2 jobs: scheduled, 1 succeeded", err)
      assert.falsy(err:find("creating", 1, true), err)
      assert.equal(0, (cli("cancel cli-watch-b " .. E)))
    end)

    it("exits 7 for a job the hub does not know", function()
      local rc, _, err = cli("show no-such-job " .. E)
      assert.equal(7, rc)
      assert.matches("JobNotFound", err)
      rc = cli("devices no-such-job " .. E)
      assert.equal(7, rc)
    end)

    it("lists jobs filtered by type and status, up to --top", function()
      local rc, out = cli("list --type method --status completed --top 1 --json " .. E)
      assert.equal(0, rc)
      local jobs = core.json_decode(out)
      assert.equal(1, #jobs)
      assert.equal("scheduleDeviceMethod", jobs[1].type)
      assert.equal("completed", jobs[1].status)
      rc, out = cli("list --type twin " .. E)
      assert.equal(0, rc)
      assert.matches("^JOB ID%s+TYPE%s+STATUS", out)
      assert.matches("\n%S+%s+twin%s+completed%s+1/0/1", out)
      assert.falsy(out:find(" method ", 1, true))
    end)
  end)

  describe("definitions files", function()
    it("plan prints each request and the devices targeted now, and changes nothing", function()
      local log = emu:access_log()
      local rc, out, err = cli("plan examples/rollout.lua " .. E)
      assert.equal(0, rc, err)
      assert.matches("job lock%-b7: direct method lockDoor", out)
      assert.matches("targets now: 60 device%(s%) match", out)
      assert.matches("stage 1/3 'canary': 2 device%(s%)", out)
      assert.matches("PUT /jobs/v2/lock%-b7%-%x+%-s1%-c1", out)
      assert.matches('{"jobId":"lock%-b7%-%x+%-s1%-c1","type":"scheduleDeviceMethod","cloudToDeviceMethod":'
        .. '{"methodName":"lockDoor","payload":{"force":true},"responseTimeoutInSeconds":15},', out)
      assert.matches("targets now: 60 device%(s%) exist of 60 listed", out)
      local after = emu:access_log(#log)
      assert.falsy(after:find('"PUT ', 1, true))
      assert.falsy(after:find('/cancel', 1, true))
      rc, out = cli("plan examples/rollout.lua --job tag-b7 --json " .. E)
      assert.equal(0, rc)
      local plan = core.json_decode(out)
      assert.equal(1, #plan.jobs)
      assert.equal("scheduleUpdateTwin", plan.jobs[1].stages[1].requests[1].body.type)
    end)

    it("plan counts a device list split into several jobs (the case it exists for)", function()
      -- 60 devices that exist and 500 long ids that do not: the first job's condition is close
      -- to 8192 characters, too long to wrap in one counting query
      local file = tmpfile("split.lua", [[
local targets = ids("b7-door-%03d", 1, 60)
for i = 1, 500 do targets[#targets + 1] = ("a-rather-long-device-identifier-%04d"):format(i) end
job "split" { method = "lockDoor", devices = targets }
]])
      local log = emu:access_log()
      local rc, out, err = cli("plan " .. sh_quote(file) .. " " .. E)
      assert.equal(0, rc, err)
      assert.matches("targets now: 60 device%(s%) exist of 560 listed", out)
      assert.matches("PUT /jobs/v2/split%-%x+%-c1  %[60 device%(s%) match now of %d+ listed%]", out)
      assert.matches("PUT /jobs/v2/split%-%x+%-c3  %[0 device%(s%) match now of %d+ listed%]", out)
      assert.falsy(emu:access_log(#log):find('"PUT ', 1, true))
      rc, out = cli("plan " .. sh_quote(file) .. " --json " .. E)
      assert.equal(0, rc)
      local plan = core.json_decode(out)
      assert.equal(60, plan.jobs[1].devices)
      assert.equal(3, #plan.jobs[1].stages[1].requests)
    end)

    it("run executes the staged rollout (3: three jammed doors failed), and a re-run adopts every job", function()
      local rc, out, err = cli("run examples/rollout.lua --interval 0.2 " .. E)
      assert.equal(3, rc, err)
      assert.matches("job lock%-b7: completed with failures", out)
      assert.matches("stage 3 'rest': 27 succeeded, 3 failed of 30; gate passed", out)
      assert.matches("job tag%-b7: succeeded", out)
      assert.matches("lock%-b7 stage 1/3 passed", err)
      local log = emu:access_log()
      rc, out, err = cli("run examples/rollout.lua --interval 0.2 " .. E)
      assert.equal(3, rc)
      assert.matches("job lock%-b7: completed with failures", out)
      assert.matches("adopted existing job lock%-b7%-%x+%-s3%-c1 %(completed%)", err)
      local after = emu:access_log(#log)
      assert.falsy(after:find('"PUT ', 1, true))
    end)

    it("runs the tutorial's two jobs from examples/tutorial-jobs.lua", function()
      local rc, out, err = cli("run examples/tutorial-jobs.lua --interval 0.2 " .. E)
      assert.equal(0, rc, err)
      assert.matches("job tutorial%-lock: succeeded\n  1 succeeded, 0 failed of 1 %[tutorial%-lock%-%x+%-c1 completed%]", out)
      assert.matches("job tutorial%-twin: succeeded", out)
      local id = out:match("(tutorial%-twin%-%x+%-c1)")
      rc, out = cli("show " .. id .. " --json " .. E)
      assert.equal(0, rc)
      assert.same({ building = "43", floor = 3 }, core.json_decode(out).updateTwin.properties.desired)
    end)

    it("run stops at a failed gate with exit 3 and says why", function()
      local file = tmpfile("gate.lua", [[
job "jammed" {
  method = "lockDoor",
  devices = { "b7-door-013", "b7-door-027", "b7-door-041", "b7-door-001" },
  stages = { { count = 2, gate = { maxFailures = 0 } }, { percent = 100 } },
}
]])
      local rc, out = cli("run " .. sh_quote(file) .. " --interval 0.2 --quiet " .. E)
      assert.equal(3, rc)
      assert.matches("rollout stopped: jammed: stage 1 gate failed: 2 device%(s%) failed, more than maxFailures 0 "
        .. "%(stage 2 not started%)", out)
    end)

    it("refuses bad files with each problem at file:line, exit 2, and sends nothing", function()
      local cases = {
        { "syntax.lua", 'job "a" {\n  method = "m"\n  query = "*",\n}\n', ":3: syntax error" },
        { "unknown.lua", 'job "a" {\n  method = "m",\n  query = "*",\n  retries = 3,\n}\n',
          ":4: job 'a', field 'retries': unknown field" },
        { "types.lua", 'job "a" {\n  method = "m",\n  query = "*",\n  ttl = "soon",\n}\n',
          ":4: job 'a', field 'ttl': 'soon' is not a duration" },
        { "ids.lua", 'job "a b" { method = "m", query = "*" }\njob "c" {\n  method = "m",\n  devices = { "ok", "no way" },\n}\n',
          ":1: job 'a b': job name 'a b' has ' '", ":4: job 'c', field 'devices': entry 2: deviceId 'no way'" },
        { "select.lua", 'job "a" {\n  method = "m",\n  query = "SELECT * FROM devices WHERE tags.x = 1",\n}\n',
          ":3: job 'a', field 'query': queryCondition must be only the condition of a WHERE clause" },
      }
      local before = emu:requests_served()
      for _, case in ipairs(cases) do
        local file = tmpfile(case[1], case[2])
        for _, command in ipairs({ "plan", "run" }) do
          local rc, out, err = cli(command .. " " .. sh_quote(file) .. " " .. E)
          assert.equal(2, rc, case[1])
          assert.equal("", out)
          for i = 3, #case do
            assert.truthy(err:find(file .. case[i], 1, true), case[1] .. " said: " .. err)
          end
          assert.matches("problem%(s%) in .*; nothing was sent", err)
        end
      end
      assert.equal(before, emu:requests_served())
    end)
  end)

  describe("progress", function()
    it("prints plain lines, without control characters, when stderr is not a terminal", function()
      local rc, _, err = cli("create method lockDoor --query \"tags.location.building = '7'\" --watch --interval 0.2 " .. E)
      assert.equal(3, rc) -- the three jammed doors
      assert.falsy(err:find("\r", 1, true))
      assert.falsy(err:find("\27", 1, true))
      assert.matches("%[0:0%d%] %S+: running, %d+ succeeded", err)
      assert.matches("completed, 57 succeeded, 3 failed, 0 pending of 60 device%(s%)\n$", err)
    end)

    -- Runs args on a pty (util-linux script); input is written to the pty after `delay` s.
    local function on_pty(args, input, delay, columns)
      local typescript = emu.tmp .. "/typescript"
      local feed = input and ("(sleep " .. delay .. "; printf '" .. input .. "'; sleep 3)") or "(sleep 0.1)"
      local _, _, rc = run("cd " .. sh_quote(ROOT) .. " && " .. feed .. " | env -u IOTHUB_CONNECTION_STRING COLUMNS="
        .. (columns or 110) .. " "
        .. "script -qfec " .. sh_quote(LUA .. " bin/iothub-jobs " .. args) .. " /dev/null >" .. sh_quote(typescript))
      return rc, read_file(typescript) or ""
    end

    it("draws a live bar on a terminal and ends its line cleanly", function()
      if not HAS_SCRIPT then pending("util-linux script is not installed") return end
      local rc, screen = on_pty("create method lockDoor --query \"tags.location.building = '7'\" --watch "
        .. "--interval 0.2 --id cli-pty-bar " .. E)
      assert.equal(3, rc)
      assert.matches("\r\27%[Kcli%-pty%-bar  running  %[#*x*%.*%]  %d+ ok  %d+ failed  %d+ pending of 60  0:0%d  ETA", screen)
      -- the last frame is the final state, and its line is ended before the summary
      assert.matches("\r\27%[Kcli%-pty%-bar  completed  %[#+x+%]  57 ok  3 failed  0 pending of 60  0:0%d  done\r?\n"
        .. "cli%-pty%-bar: completed, 60 device%(s%): 57 succeeded, 3 failed", screen)
    end)

    it("fits the bar into 80 columns: a UUID label shortened, the counts, elapsed time and ETA whole", function()
      if not HAS_SCRIPT then pending("util-linux script is not installed") return end
      local rc, screen = on_pty("create method lockDoor --query \"tags.location.building = '7'\" --watch "
        .. "--interval 0.2 " .. E, nil, nil, 80)
      assert.equal(3, rc)
      local id = screen:match("created job (%x+%-[%x%-]+)")
      assert.equal(36, #id)
      local short = id:sub(1, 8)
      assert.matches("\r\27%[K" .. short .. "  running  %[[#x%.]+%]  %d+ ok  %d+ failed  %d+ pending of 60  0:0%d  ETA "
        .. "[%d%-]+:[%d%-]+", screen)
      assert.matches("\r\27%[K" .. short .. "  completed  %[[#x]+%]  57 ok  3 failed  0 pending of 60  0:0%d  done\r?\n"
        .. id:gsub("%-", "%%-") .. ": completed", screen)
      for frame in screen:gmatch("\r\27%[K([^\r\n]*)") do
        assert.is_true(#frame <= 79, #frame .. " columns: " .. frame)
      end
    end)

    it("exits 130 on Ctrl-C while watching", function()
      if not HAS_SCRIPT then pending("util-linux script is not installed") return end
      assert.equal(0, (cli("create method lockDoor --device door-005 --start +1h --id cli-pty-int " .. E)))
      local rc, screen = on_pty("watch cli-pty-int --interval 0.2 " .. E, "\\003", 1)
      assert.equal(130, rc)
      assert.matches("cli%-pty%-int  %a+  %[%.+%].-%^C\r?\niothub%-jobs: interrupted; these jobs keep running on the hub: "
        .. "cli%-pty%-int\r?\n`iothub%-jobs watch cli%-pty%-int` watches again", screen)
      assert.equal(0, (cli("cancel cli-pty-int " .. E)))
    end)

    it("exits 130 on Ctrl-C, ends the bar line and says what keeps running", function()
      if not HAS_SCRIPT then pending("util-linux script is not installed") return end
      local file = tmpfile("later.lua", 'job "later" { method = "lockDoor", devices = { "door-004" }, start = "+1h" }\n')
      local rc, screen = on_pty("run " .. sh_quote(file) .. " --interval 0.2 " .. E, "\\003", 1.5)
      assert.equal(130, rc)
      assert.matches("later  %a+  %[%.+%]  0 ok  0 failed  %d pending of ~?1  0:0%d  starts in 59:%d%d%^C\r?\n", screen)
      assert.matches("iothub%-jobs: interrupted; these jobs keep running on the hub: later%-%x+%-c1", screen)
      assert.matches("re%-run `iothub%-jobs run .*later.lua` to resume", screen)
      -- the job is there, still waiting; cancel it
      local id = screen:match("(later%-%x+%-c1)")
      local code, out = cli("cancel " .. id .. " " .. E)
      assert.equal(0, code)
      assert.matches("cancelled", out)
    end)
  end)
end)

describe("iothub-jobs output (offline)", function()
  local Progress = require "iothub.cli.progress"
  local commands = require "iothub.cli.commands"
  local connection = require "iothub.cli.connection"
  local Pager = require "iothub.pager"
  local errors = require "iothub.errors"

  -- A stream that keeps what is written.
  local function buffer()
    local b = { parts = {} }
    function b:write(...)
      for _, s in ipairs({ ... }) do self.parts[#self.parts + 1] = tostring(s) end
      return self
    end
    function b.flush() end
    function b:text() return table.concat(self.parts) end
    return b
  end

  describe("the progress bar at 80 columns", function()
    local clock
    local function progress()
      clock = 100
      return Progress.new({ mode = "bar", width = 80, stream = buffer(), now = function() return clock end,
        time = function() return 1000 end })
    end

    it("keeps the bar for the README's stage label by shortening the label", function()
      local p = progress()
      local view = { label = "lock-b7 stage 2/3", name = "lock-b7", stage = 2, stages = 3, status = "running",
        deviceCount = 28, succeededCount = 14, failedCount = 1, started = 99 }
      p:bar_text(view)
      clock = 115 -- 15 devices done in 15 s: 13 to go take 13 s
      local line = p:bar_text(view)
      assert.matches("^lock%-b7 2/3  running  %[##x%.%]  14 ok  1 failed  13 pending of 28  0:16  ETA 0:13$", line)
      assert.is_true(#line <= 79)
      -- wide enough, the label stays whole
      p.width = 110
      assert.matches("^lock%-b7 stage 2/3  running  %[#+x%.+%]  14 ok", p:bar_text(view))
    end)

    it("shortens create's UUID label to its first 8 characters and never cuts the counts, elapsed or ETA", function()
      local p = progress()
      local id = "2f1c9a7e-1b2c-4d5e-8f90-0123456789ab"
      local line = p:bar_text({ label = id, status = "running", deviceCount = 60, succeededCount = 40, failedCount = 3,
        started = 99 })
      assert.matches("^2f1c9a7e  running  %[#+x+%.*%]  40 ok  3 failed  17 pending of 60  0:01  ETA %-%-:%-%-$", line)
      line = p:bar_text({ label = id, status = "scheduled", startTime = 1000 + 3599, deviceCount = 1, estimated = true,
        started = 99 })
      assert.matches("0 ok  0 failed  1 pending of ~1  0:01  starts in 59:59$", line)
      assert.is_true(#line <= 79)
      -- many jobs and big numbers: "(k/n jobs)" and the bar go before anything of the counts
      line = p:bar_text({ label = "big", status = "running", jobs = 3, finished = 1, deviceCount = 10000,
        succeededCount = 1234, failedCount = 12, started = 99 })
      assert.matches("^big  running  1234 ok  12 failed  8754 pending of 10000  0:01  ETA", line)
    end)
  end)

  it("prints a plain line only when something changes, not when the start countdown ticks", function()
    local stream, wall = buffer(), 1000
    local p = Progress.new({ mode = "lines", stream = stream, now = function() return 0 end,
      time = function() return wall end })
    local view = { label = "later", status = "scheduled", startTime = 1000 + 3600, deviceCount = 1, started = 0 }
    for _ = 1, 5 do
      p:update(view)
      wall = wall + 2
    end
    local text = stream:text()
    local _, lines = text:gsub("\n", "")
    assert.equal(1, lines, text)
    assert.matches("later: scheduled, 0 succeeded, 0 failed, 1 pending of 1 device%(s%) %(starts in 1:00:00%)", text)
    view.status = "running"
    p:update(view)
    _, lines = stream:text():gsub("\n", "")
    assert.equal(2, lines)
  end)

  describe("list output when the hub fails", function()
    -- `list` with a JobClient whose pages are `pages` (an array per page, or an error).
    local function list(pages, json)
      local out, err = buffer(), buffer()
      local fetched = 0
      local jobs = { queryJobs = function()
        return Pager.new(function()
          fetched = fetched + 1
          local page = pages[fetched]
          if page.kind then return nil, page end
          return page, pages[fetched + 1] and ("token" .. fetched) or nil
        end)
      end }
      local ctx = { options = { json = json }, args = {}, out = out, err = err, command = "list",
        progress = Progress.new({ mode = "off", stream = err }), connect = function() return { jobs = jobs } end }
      return commands.list(ctx), out:text(), err:text()
    end
    local refused = errors.new({ kind = "service", status = 503, code = "ServiceUnavailable", operation = "queryJobs",
      message = "try later" })
    local job = { jobId = "j1", type = "scheduleDeviceMethod", status = "completed" }

    it("prints nothing on stdout when the first page fails", function()
      for _, json in ipairs({ true, false }) do
        local rc, out, err = list({ refused }, json)
        assert.equal(7, rc)
        assert.equal("", out)
        assert.matches("ServiceUnavailable", err)
      end
    end)

    it("leaves the JSON array unclosed when a later page fails, so a parser notices", function()
      local rc, out, err = list({ { job, job }, refused }, true)
      assert.equal(7, rc)
      assert.matches("^%[{.*},{.*}\n$", out)
      assert.is_nil(core.json_decode(out))
      assert.matches("ServiceUnavailable", err)
      rc, out = list({ { job }, refused }, false)
      assert.equal(7, rc)
      assert.matches("^JOB ID[^\n]*\nj1 [^\n]*\n$", out)
    end)

    it("prints complete output when every page comes", function()
      local rc, out = list({ { job }, { job } }, true)
      assert.equal(0, rc)
      assert.equal(2, #core.json_decode(out))
      rc, out = list({ {} }, true)
      assert.equal(0, rc)
      assert.equal("[]\n", out)
    end)
  end)

  it("retries briefly on this machine's hubs (emulators), and as the client does elsewhere", function()
    local cs = "HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey=" .. core.base64_encode("k")
    local near = assert(connection.clients({ connectionString = cs, endpoint = "http://127.0.0.1:8080" }))
    assert.equal(2, near.jobs.cfg.retry.maxAttempts)
    -- rollouts create jobs through the same client: its retry policy, a 429004 returned at once
    assert.is_nil(near.creator)
    near = assert(connection.clients({ connectionString = cs })) -- https://localhost
    assert.equal(2, near.registry.cfg.retry.maxAttempts)
    local far = assert(connection.clients({ connectionString = cs:gsub("localhost", "myhub.azure-devices.net") }))
    assert.equal(5, far.jobs.cfg.retry.maxAttempts)
    assert.equal(120, far.jobs.cfg.retry.deadline)
    for endpoint, loopback in pairs({ ["http://127.0.0.1:9"] = true, ["https://[::1]:8443"] = true,
      ["https://LOCALHOST"] = true, ["https://127.example.com"] = false, ["https://myhub.azure-devices.net"] = false }) do
      assert.equal(loopback, connection.is_loopback(endpoint), endpoint)
    end
  end)
end)
