--- The iothub-jobs command line: parse, connect, run one command, map the outcome to an
-- exit code (iothub.cli.exitcodes). bin/iothub-jobs calls main(arg) and exits with its result.
--
-- Ctrl-C: the lua5.4 and luajit interpreters turn SIGINT into an "interrupted!" error at the
-- next Lua instruction. Waiting happens in short slices in Lua, so that error arrives
-- promptly; it is caught here, the progress line is ended, and the command exits with
-- INTERRUPTED (130), saying which jobs keep running on the hub.
-- @module iothub.cli
local iothub = require "iothub"
local args = require "iothub.cli.args"
local exitcodes = require "iothub.cli.exitcodes"
local connection = require "iothub.cli.connection"
local Progress = require "iothub.cli.progress"
local commands = require "iothub.cli.commands"

local M = {}

local function is_interrupt(e)
  return type(e) == "string" and e:find("interrupted!", 1, true) ~= nil
end

--- Runs the command line argv (an array). io: optional { out=, err=, getenv=, progress = mode }.
-- Returns the exit code.
function M.main(argv, io_opts)
  io_opts = io_opts or {}
  local out, err = io_opts.out or io.stdout, io_opts.err or io.stderr
  local getenv = io_opts.getenv or os.getenv
  local parsed, message = args.parse(argv or {})
  if not parsed then
    err:write(message, "\n")
    return exitcodes.USAGE
  end
  if parsed.command == "help" then
    local topic = parsed.args[1]
    if topic and not args.BY_NAME[topic] then
      err:write(args.PROGRAM, ": no command '", topic, "'\n", args.overview())
      return exitcodes.USAGE
    end
    out:write(topic and args.help(topic) or args.overview())
    return exitcodes.OK
  end
  if parsed.command == "version" then
    out:write(args.PROGRAM, " ", iothub._VERSION, "\n")
    return exitcodes.OK
  end

  local o = parsed.options
  local ctx = {
    command = parsed.command, options = o, args = parsed.args, out = out, err = err, getenv = getenv,
    sleep = connection.interruptible_sleep,
    progress = Progress.new({ stream = err, mode = o.quiet and "off" or io_opts.progress }),
  }
  function ctx.connect()
    local conn, why = connection.resolve(o, getenv)
    if not conn then
      err:write(args.PROGRAM, " ", parsed.command, ": ", why, "\n")
      return nil, exitcodes.USAGE
    end
    ctx.conn = conn
    local clients, cerr = connection.clients(conn, { sleep = ctx.sleep })
    if not clients then
      err:write(args.PROGRAM, ": ", tostring(cerr), "\n")
      return nil, exitcodes.for_error(cerr)
    end
    return clients
  end

  local ok, result = xpcall(function() return commands[parsed.command](ctx) end, function(e)
    if is_interrupt(e) then return e end
    return debug.traceback(tostring(e), 2)
  end)
  if ok then return result end
  ctx.progress:close()
  if is_interrupt(result) then
    local running = ctx.rollout and ctx.rollout:unfinished() or {}
    err:write(args.PROGRAM, ": interrupted")
    if #running > 0 then
      err:write("; these jobs keep running on the hub: ", table.concat(running, ", "), "\n")
      if parsed.command == "run" then
        err:write("re-run `", args.PROGRAM, " run ", tostring(parsed.args[1]), "` to resume (it adopts them), or `",
          args.PROGRAM, " cancel JOBID` to stop one\n")
      else
        err:write("`", args.PROGRAM, " watch ", table.concat(running, " "), "` watches again; `", args.PROGRAM,
          " cancel JOBID` stops a job\n")
      end
    else
      err:write("\n")
    end
    return exitcodes.INTERRUPTED
  end
  err:write(args.PROGRAM, ": internal error (please report it): ", tostring(result), "\n")
  return exitcodes.INTERNAL
end

return M
