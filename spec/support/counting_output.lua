-- A busted output handler for .ci/test: busted's own utfTerminal output for people, plus the
-- counts as JSON in the file named by BUSTED_COUNTS_FILE for the script that adds them up
-- (so nothing parses terminal text).
--   BUSTED_COUNTS_FILE=/tmp/c.json busted -o spec/support/counting_output.lua spec
--   -> {"successes":N,"failures":N,"errors":N,"pendings":N}
return function(options)
  local busted = require "busted"
  local terminal = require("busted.outputHandlers.utfTerminal")(options)
  local path = os.getenv("BUSTED_COUNTS_FILE")

  local function write_counts()
    if not path or path == "" then return nil, true end
    local f = assert(io.open(path, "w"))
    f:write(('{"successes":%d,"failures":%d,"errors":%d,"pendings":%d}\n'):format(#terminal.successes,
      #terminal.failures, #terminal.errors, #terminal.pendings))
    f:close()
    return nil, true
  end

  -- After the terminal's own suite-end summary (lower priority runs later).
  busted.subscribe({ "suite", "end" }, write_counts, { priority = 2 })
  return terminal
end
