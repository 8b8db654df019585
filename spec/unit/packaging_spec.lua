-- The rockspec and the Makefile each list what goes into the package; a file added to one and
-- not the other builds with make and fails after `luarocks make` (undefined symbols, a missing
-- module). These checks keep the two lists and the source tree in step.

local function read(path)
  local f = assert(io.open(path, "rb"))
  local text = f:read("a")
  f:close()
  return text
end

local function load_rockspec()
  local env = {}
  local chunk = assert(load(read("iothub-jobs-scm-1.rockspec"), "rockspec", "t", env))
  chunk()
  return env
end

-- The value of a Makefile variable, with backslash continuations joined.
local function make_list(name)
  local text = read("Makefile"):gsub("\\\n", " ")
  local value = text:match("\n" .. name .. "%s*=%s*([^\n]*)")
  assert(value, "Makefile has no " .. name)
  local list = {}
  for word in value:gmatch("%S+") do list[#list + 1] = word end
  table.sort(list)
  return list
end

local function sorted(t)
  local copy = {}
  for i, v in ipairs(t) do copy[i] = v end
  table.sort(copy)
  return copy
end

local function files(command)
  local list = {}
  local p = assert(io.popen(command))
  for line in p:lines() do list[#list + 1] = line end
  p:close()
  table.sort(list)
  return list
end

describe("packaging", function()
  local spec = load_rockspec()
  local modules = spec.build.modules

  it("builds iothub.core from the same C files as the Makefile", function()
    assert.same(make_list("CORE_SRC"), sorted(modules["iothub.core"].sources))
  end)

  it("builds iothub.curl from the same C files as the Makefile", function()
    assert.same(make_list("CURL_SRC"), sorted(modules["iothub.curl"].sources))
  end)

  it("compiles every C source file into one of the two modules", function()
    local built = {}
    for _, list in ipairs({ make_list("CORE_SRC"), make_list("CURL_SRC") }) do
      for _, f in ipairs(list) do built[#built + 1] = f end
    end
    assert.same(files("ls csrc/*.c"), sorted(built))
  end)

  it("installs every Lua module of lua/iothub under its module name", function()
    local listed = {}
    for name, source in pairs(modules) do
      if type(source) == "string" then
        listed[#listed + 1] = source
        -- lua/iothub/cli/init.lua may install as iothub.cli or iothub.cli.init: both load.
        local expected = source:gsub("^lua/", ""):gsub("%.lua$", ""):gsub("/", ".")
        assert.is_true(name == expected or name .. ".init" == expected,
          source .. " installed as " .. name)
      end
    end
    assert.same(files("find lua/iothub -name '*.lua'"), sorted(listed))
  end)
end)
