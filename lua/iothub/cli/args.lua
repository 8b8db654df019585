--- Command-line parsing for iothub-jobs: commands, their options and positionals, values
-- converted and checked at parse time, and help text generated from the same tables.
-- Errors say what is wrong and what to type instead.
-- @module iothub.cli.args
local core = require "iothub.core"
local definitions = require "iothub.definitions"
local exitcodes = require "iothub.cli.exitcodes"

local M = {}

M.PROGRAM = "iothub-jobs"

---------------------------------------------------------------------------
-- Value kinds

local KINDS = {}

function KINDS.string(text) return text end

function KINDS.int(text, opt)
  local n = tonumber(text)
  if not n or n % 1 ~= 0 or n < (opt.min or 1) or (opt.max and n > opt.max) then
    return nil, ("'%s' is not a whole number%s"):format(text,
      opt.max and (" from " .. (opt.min or 1) .. " to " .. opt.max) or (" of at least " .. (opt.min or 1)))
  end
  return math.floor(n)
end

function KINDS.number(text)
  local n = tonumber(text)
  if not n or n <= 0 or n ~= n or n == math.huge then return nil, "'" .. text .. "' is not a positive number of seconds" end
  return n
end

function KINDS.duration(text)
  local n, why = definitions.parse_duration(text)
  if not n then return nil, why end
  if n < 1 then return nil, "must be at least 1 second" end
  return n
end

function KINDS.start(text)
  if text:match("^%d+%.?%d*$") then text = tonumber(text) end
  return definitions.parse_start(text)
end

-- JSON text, or @file with JSON in it.
function KINDS.json(text)
  local source, where = text, "the value"
  if text:sub(1, 1) == "@" then
    local err
    where = text:sub(2)
    source, err = definitions.read_file(where)
    if not source then return nil, "cannot read " .. where .. ": " .. tostring(err) end
  end
  local value, why = core.json_decode(source)
  if value == nil then
    return nil, ("%s is not valid JSON (%s); write it like '{\"force\":true}', or @file.json"):format(where, tostring(why))
  end
  return value
end

-- Comma-separated, repeatable: --device a,b --device c
function KINDS.list(text)
  local out = {}
  for item in text:gmatch("[^,]+") do
    item = item:match("^%s*(.-)%s*$")
    if item ~= "" then out[#out + 1] = item end
  end
  if #out == 0 then return nil, "is empty" end
  return out
end

---------------------------------------------------------------------------
-- Options and commands

local CONNECTION = {
  { "connection-string", "c", arg = "CS", help = "service connection string (HostName=...;SharedAccessKeyName=...;" ..
    "SharedAccessKey=...); prefer the IOTHUB_CONNECTION_STRING variable, which `ps` cannot see" },
  { "emulator", nil, arg = "DIR", optional = true, help = "use a running bin/iothub-emulator: --emulator=DIR reads " ..
    "the connection from its --dir (or the launcher's saved output file); bare --emulator uses " ..
    "IOTHUB_EMULATOR_DIR, else the emulator's defaults (http://127.0.0.1:8080, development key)" },
  { "endpoint", nil, arg = "URL", help = "send requests here instead of https://<HostName> (e.g. " ..
    "http://127.0.0.1:8080); default $IOTHUB_ENDPOINT" },
  { "ca-file", nil, arg = "FILE", help = "trust this CA for HTTPS (e.g. the emulator's certs/ca.pem); default $IOTHUB_CA_FILE" },
}
local OUTPUT = {
  { "json", nil, kind = "flag", help = "print JSON for scripts on stdout (progress, if any, goes to stderr)" },
  { "quiet", nil, kind = "flag", help = "no progress output" },
  { "help", "h", kind = "flag", help = "show this help" },
}
-- A limit of the definitions file's sandbox (the knob's name, default and variable are the C
-- core's); checked with the others when the file is loaded.
local function sandbox_option(kind, arg, help)
  local knob = core.sandbox_knobs[kind]
  return { knob.flag:sub(3), nil, arg = arg, help = help .. " (default " .. knob.default_text .. "; also $" ..
    knob.env .. ")" }
end
-- plan and run: which jobs of a definitions file, how device lists are split, and the limits
-- the file runs under.
local DEFINITIONS = {
  { "job", nil, arg = "NAME", kind = "list", repeatable = true, help = "only these jobs of the file" },
  { "max-condition-length", nil, arg = "N", kind = "int", min = 64, max = 8192,
    help = "split device lists into conditions of at most N characters (default 8192, the hub's limit)" },
  sandbox_option("memory", "SIZE", "stop the definitions file when it has allocated SIZE, e.g. 512M or 2G"),
  sandbox_option("instructions", "N", "stop the definitions file after N Lua instructions"),
  sandbox_option("seconds", "SECONDS", "stop the definitions file after SECONDS of running"),
}
local WATCHING = {
  { "interval", nil, arg = "SECONDS", kind = "number", help = "seconds between polls (default 2)" },
  { "timeout", nil, arg = "DURATION", kind = "duration", help = "stop watching after this long (e.g. 30m); " ..
    "the job keeps running; default: until the job ends" },
}

local function concat(...)
  local out = {}
  for _, list in ipairs({ ... }) do for _, o in ipairs(list) do out[#out + 1] = o end end
  return out
end

M.COMMANDS = {
  {
    name = "create", args = "method METHOD | twin",
    summary = "schedule a direct-method or twin-update job",
    positionals = { { "kind", choices = { "method", "twin" } }, { "method", optional = true } },
    options = concat({
      { "query", "q", arg = "CONDITION", help = "WHERE condition selecting the devices (\"*\" for all), e.g. " ..
        "\"tags.location.building = '43'\"" },
      { "device", "d", arg = "ID[,ID...]", kind = "list", repeatable = true,
        help = "target these device ids (comma-separated)" },
      { "id", nil, arg = "JOBID", help = "job id (default: a fresh UUID)" },
      { "start", nil, arg = "TIME", kind = "start", help = "when to start: now (default), +10m, " ..
        "2030-01-31T08:00:00Z or epoch seconds" },
      { "ttl", nil, arg = "DURATION", kind = "duration", help = "maxExecutionTimeInSeconds (default 3600; e.g. 600, 10m, 1h)" },
      { "payload", nil, arg = "JSON|@FILE", kind = "json", help = "method payload (default null)" },
      { "response-timeout", nil, arg = "SECONDS", kind = "int", min = 5, max = 300,
        help = "how long each device has to answer the method (5-300, default 30)" },
      { "connect-timeout", nil, arg = "SECONDS", kind = "int", min = 0, max = 300,
        help = "how long to wait for a device to connect (0-300)" },
      { "patch", nil, arg = "JSON|@FILE", kind = "json", help = "twin patch: {\"tags\":{...},\"properties\":" ..
        "{\"desired\":{...}}} (a top-level \"desired\" is accepted)" },
      { "watch", "w", kind = "flag", help = "watch the job until it ends (exit code from its outcome)" },
    }, WATCHING, OUTPUT, CONNECTION),
    examples = {
      "iothub-jobs create method lockDoor --device myDeviceId --payload '{\"force\":true}' --watch",
      "iothub-jobs create twin --query \"tags.location.building = '43'\" --patch '{\"desired\":{\"floor\":3}}'",
      "iothub-jobs create method reboot --query '*' --start +1h --ttl 2h",
    },
  },
  {
    name = "show", args = "JOBID", summary = "show a job's status and device statistics",
    positionals = { { "jobid" } },
    options = concat(OUTPUT, CONNECTION),
  },
  {
    name = "list", args = "", summary = "list jobs, newest state first as the hub returns them",
    positionals = {},
    options = concat({
      { "type", nil, arg = "TYPE", choices = { "method", "twin", "scheduleDeviceMethod", "scheduleUpdateTwin" },
        help = "method or twin (or the wire names scheduleDeviceMethod, scheduleUpdateTwin)" },
      { "status", nil, arg = "STATUS", choices = { "queued", "scheduled", "running", "completed", "failed", "cancelled" },
        help = "queued, scheduled, running, completed, failed or cancelled" },
      { "top", nil, arg = "N", kind = "int", min = 1, help = "at most N jobs" },
    }, OUTPUT, CONNECTION),
  },
  {
    name = "cancel", args = "JOBID...", summary = "cancel jobs that have not finished",
    positionals = { { "jobid", many = true } },
    options = concat(OUTPUT, CONNECTION),
  },
  {
    name = "watch", args = "JOBID...", summary = "watch jobs until they end, with a progress bar on a terminal",
    positionals = { { "jobid", many = true } },
    options = concat(WATCHING, OUTPUT, CONNECTION),
  },
  {
    name = "devices", args = "JOBID", summary = "per-device results of a job",
    positionals = { { "jobid" } },
    options = concat({
      { "failed", nil, kind = "flag", help = "only the devices that failed" },
      { "status", nil, arg = "STATUS", choices = { "pending", "scheduled", "running", "completed", "failed", "canceled" },
        help = "only rows with this device status (pending, running, completed, failed, canceled)" },
    }, OUTPUT, CONNECTION),
  },
  {
    name = "plan", args = "FILE", summary = "show what a definitions file would send, and how many devices each job targets now",
    positionals = { { "file" } },
    options = concat(DEFINITIONS, OUTPUT, CONNECTION),
  },
  {
    name = "run", args = "FILE", summary = "run a definitions file: create (or resume) its jobs, stage by stage, and watch them",
    positionals = { { "file" } },
    options = concat(DEFINITIONS, {
      { "max-active-jobs", nil, arg = "N", kind = "int", min = 1, help = "run at most N jobs at once " ..
        "(default: as many as the hub allows, learnt from 429004; S1 allows 1, S2 5, S3 10)" },
    }, WATCHING, OUTPUT, CONNECTION),
  },
  {
    name = "help", args = "[COMMAND]", summary = "help on a command",
    positionals = { { "topic", optional = true } },
    options = {},
  },
}

local BY_NAME = {}
for _, c in ipairs(M.COMMANDS) do
  BY_NAME[c.name] = c
  c.by_long, c.by_short = {}, {}
  for _, o in ipairs(c.options) do
    o.long, o.short = o[1], o[2]
    o.kind = o.kind or "string"
    c.by_long[o.long] = o
    if o.short then c.by_short[o.short] = o end
  end
end
M.BY_NAME = BY_NAME
-- Options every hub command takes, by long and short name.
local GLOBAL = {}
for _, o in ipairs(CONNECTION) do
  GLOBAL[o[1]] = o
  if o[2] then GLOBAL[o[2]] = o end
end

local function names(list)
  local out = {}
  for _, item in ipairs(list) do out[#out + 1] = type(item) == "table" and item.name or item end
  return out
end

---------------------------------------------------------------------------
-- Help

local function wrap(text, width, indent)
  local lines, line = {}, ""
  for word in text:gmatch("%S+") do
    if #line > 0 and #line + 1 + #word > width then
      lines[#lines + 1] = line
      line = word
    else
      line = #line > 0 and (line .. " " .. word) or word
    end
  end
  if #line > 0 then lines[#lines + 1] = line end
  return table.concat(lines, "\n" .. indent)
end

-- Appends the exit code table to help lines.
local function add_exit_codes(out)
  out[#out + 1] = ""
  out[#out + 1] = "Exit codes:"
  for _, row in ipairs(exitcodes.TABLE) do out[#out + 1] = ("  %3d  %s"):format(row[1], row[2]) end
end

function M.overview()
  local out = {
    "Usage: " .. M.PROGRAM .. " COMMAND [options]",
    "",
    "Schedule, watch and roll out Azure IoT Hub jobs (direct methods and twin updates).",
    "",
    "Commands:",
  }
  for _, c in ipairs(M.COMMANDS) do
    out[#out + 1] = ("  %-8s %s"):format(c.name, c.summary)
  end
  out[#out + 1] = ""
  out[#out + 1] = "Connection: --connection-string CS, else $IOTHUB_CONNECTION_STRING, or --emulator[=DIR]"
  out[#out + 1] = "for a local bin/iothub-emulator. `" .. M.PROGRAM .. " COMMAND --help` shows a command's options."
  add_exit_codes(out)
  return table.concat(out, "\n") .. "\n"
end

function M.help(name)
  local c = BY_NAME[name]
  if not c then return M.overview() end
  local out = { ("Usage: %s %s %s [options]"):format(M.PROGRAM, c.name, c.args):gsub("  +", " "), "",
    c.summary:sub(1, 1):upper() .. c.summary:sub(2) .. ".", "" }
  if #c.options > 0 then
    out[#out + 1] = "Options:"
    for _, o in ipairs(c.options) do
      local flag = (o.short and ("-" .. o.short .. ", ") or "    ") .. "--" .. o.long
      if o.arg then flag = flag .. (o.optional and ("[=" .. o.arg .. "]") or (" " .. o.arg)) end
      local help = o.help .. (o.repeatable and " [repeatable]" or "")
      if #flag > 28 then
        out[#out + 1] = "  " .. flag
        out[#out + 1] = (" "):rep(32) .. wrap(help, 72, (" "):rep(32))
      else
        out[#out + 1] = ("  %-29s %s"):format(flag, wrap(help, 72, (" "):rep(32)))
      end
    end
  end
  if c.examples then
    out[#out + 1] = ""
    out[#out + 1] = "Examples:"
    for _, e in ipairs(c.examples) do out[#out + 1] = "  " .. e end
  end
  if c.name == "run" or c.name == "watch" or c.name == "create" then add_exit_codes(out) end
  return table.concat(out, "\n") .. "\n"
end

---------------------------------------------------------------------------
-- Parsing

-- A usage error: message plus the command it is about (for the "see --help" hint).
local function usage(command, message)
  local where = command and (M.PROGRAM .. " " .. command.name) or M.PROGRAM
  local hint = command and (M.PROGRAM .. " " .. command.name .. " --help") or (M.PROGRAM .. " --help")
  return nil, ("%s: %s\n(see %s)"):format(where, message, hint)
end

local function convert(command, o, text)
  if o.choices then
    for _, choice in ipairs(o.choices) do
      if choice == text then return text end
    end
    local lower = text:lower()
    for _, choice in ipairs(o.choices) do
      if choice:lower() == lower then return choice end
    end
    local hint = definitions.suggest(text, o.choices, o.long == "status" and { canceled = "cancelled", cancelled = "canceled" })
    return usage(command, ("--%s: '%s' is not one of %s%s"):format(o.long, text, table.concat(o.choices, ", "),
      hint and ("; did you mean '" .. hint .. "'?") or ""))
  end
  local value, why = KINDS[o.kind](text, o)
  if value == nil then return usage(command, "--" .. o.long .. ": " .. why) end
  return value
end

--- Parses argv (an array of strings). Returns { command=, options = { [long]=value }, args = {...} }
-- or nil, message (a usage error to print, exit code USAGE).
function M.parse(argv)
  local command
  local rest = {}
  local i = 1
  -- The command is the first word that is not an option (help and --help may come first).
  while i <= #argv do
    local a = argv[i]
    if a == "--help" or a == "-h" then
      local topic = command and command.name or (BY_NAME[argv[i + 1] or ""] and argv[i + 1])
      return { command = "help", options = {}, args = { topic } }
    elseif a == "--version" then
      return { command = "version", options = {}, args = {} }
    elseif a:sub(1, 1) == "-" and not command then
      -- An option before the command is parsed once the command is known; a connection
      -- option given as "--endpoint URL" brings its value along.
      rest[#rest + 1] = a
      local o = GLOBAL[a:match("^%-%-([^=]+)$") or a:match("^%-(%a)$") or ""]
      if o and o.arg and not o.optional and argv[i + 1] then
        i = i + 1
        rest[#rest + 1] = argv[i]
      end
    elseif not command then
      command = BY_NAME[a]
      if not command then
        local hint = definitions.suggest(a, names(M.COMMANDS))
        return usage(nil, "unknown command '" .. a .. "'" .. (hint and ("; did you mean '" .. hint .. "'?") or
          "; commands: " .. table.concat(names(M.COMMANDS), ", ")))
      end
    else
      rest[#rest + 1] = a
    end
    i = i + 1
  end
  if not command then
    if #rest > 0 then return usage(nil, "give a command before the options, e.g. " .. M.PROGRAM .. " show JOBID") end
    -- No command at all: the overview, as a usage error (a script that forgot its command
    -- must not see success).
    return nil, (M.overview():gsub("\n$", ""))
  end

  local out = { command = command.name, options = {}, args = {} }
  local only_positionals = false
  i = 1
  while i <= #rest do
    local a = rest[i]
    if only_positionals or a == "-" or a:sub(1, 1) ~= "-" then
      out.args[#out.args + 1] = a
    elseif a == "--" then
      only_positionals = true
    else
      local name, value, o
      if a:sub(1, 2) == "--" then
        name, value = a:match("^%-%-([^=]+)=(.*)$")
        name = name or a:sub(3)
        o = command.by_long[name]
        if not o then
          local longs = {}
          for _, opt in ipairs(command.options) do longs[#longs + 1] = opt.long end
          local hint = definitions.suggest(name, longs)
          return usage(command, "unknown option '--" .. name .. "'" .. (hint and ("; did you mean '--" .. hint .. "'?") or ""))
        end
      else
        name = a:sub(2, 2)
        o = command.by_short[name]
        if not o then return usage(command, "unknown option '-" .. name .. "'") end
        if #a > 2 then value = a:sub(3) end
      end
      if o.kind == "flag" then
        if value then return usage(command, "--" .. o.long .. " takes no value") end
        out.options[o.long] = true
      else
        if value == nil and not o.optional then
          i = i + 1
          value = rest[i]
          if value == nil then return usage(command, "--" .. o.long .. " needs a value: --" .. o.long .. " " .. o.arg) end
        end
        if value == nil then
          out.options[o.long] = true -- an optional value left out (e.g. bare --emulator)
        else
          local converted, err = convert(command, o, value)
          if converted == nil then return nil, err end
          if o.repeatable then
            local list = out.options[o.long] or {}
            for _, item in ipairs(type(converted) == "table" and converted or { converted }) do list[#list + 1] = item end
            out.options[o.long] = list
          elseif out.options[o.long] ~= nil then
            return usage(command, "--" .. o.long .. " is given twice; give it once")
          else
            out.options[o.long] = converted
          end
        end
      end
    end
    i = i + 1
  end
  if out.options.help then return { command = "help", options = {}, args = { command.name } } end

  -- Positionals
  local positionals = command.positionals
  local p = 1
  for idx, spec in ipairs(positionals) do
    if spec.many then
      if #out.args < p then return usage(command, "give at least one " .. spec[1]:upper()) end
      p = #out.args + 1
    elseif out.args[p] == nil then
      if not spec.optional then return usage(command, "missing " .. spec[1]:upper()) end
    else
      if spec.choices then
        local ok = false
        for _, c in ipairs(spec.choices) do if c == out.args[p] then ok = true end end
        if not ok then
          return usage(command, ("'%s' is not %s"):format(out.args[p], table.concat(spec.choices, " or ")))
        end
      end
      p = p + 1
    end
    if idx == #positionals and p <= #out.args then
      return usage(command, "unexpected argument '" .. out.args[p] .. "'")
    end
  end
  if #positionals == 0 and #out.args > 0 then
    return usage(command, "unexpected argument '" .. out.args[1] .. "'")
  end
  return out
end

M.usage = usage

return M
