-- IoT Hub query language subset (hub-behavior.md §1): SELECT * [TOP n] FROM devices |
-- devices.jobs [WHERE cond]. Interface kept small so a C implementation can replace it:
--   plan = query.parse(sql)              -> plan | nil, message
--   plan = query.parse_condition(where)  -> plan (job queryCondition; "*" = all) | nil, message
--   query.matches(plan, doc)             -> boolean
--   query.filter(plan, docs)             -> array of the docs that match (order kept)
-- A plan is { collection = "devices" | "devices.jobs", top = n|nil, where = ast|nil }.
local core = require "iothub.core"

local null = core.null
local M = {}

M.MAX_LENGTH = 8192

local UNDEF = setmetatable({}, { __tostring = function() return "undefined" end })

---------------------------------------------------------------------------
-- Lexer

local function lex(src)
  local toks, i, n = {}, 1, #src
  local function push(t, v, pos) toks[#toks + 1] = { t = t, v = v, pos = pos } end
  while i <= n do
    local c = src:sub(i, i)
    if c:match("%s") then
      i = i + 1
    elseif c:match("[%a_$]") then
      local s, e = src:find("^[%w_$]+", i)
      push("ident", src:sub(s, e), i)
      i = e + 1
    elseif src:sub(i, i + 1) == "[[" then
      local close = src:find("]]", i + 2, true)
      if not close then return nil, "unterminated [[ identifier at position " .. i end
      push("ident", src:sub(i + 2, close - 1), i)
      toks[#toks].escaped = true
      i = close + 2
    elseif c:match("%d") or (c == "." and src:sub(i + 1, i + 1):match("%d")) then
      local hex = src:match("^0[xX]%x+", i)
      if hex then
        push("number", tonumber(hex:sub(3), 16), i)
        i = i + #hex
      else
        local num = src:match("^%d*%.?%d*[eE][%+%-]?%d+", i) or src:match("^%d*%.?%d*", i)
        push("number", tonumber(num), i)
        i = i + #num
      end
    elseif c == "'" or c == '"' then
      local buf, j = {}, i + 1
      while true do
        local ch = src:sub(j, j)
        if ch == "" then return nil, "unterminated string starting at position " .. i end
        if ch == c then break end
        if ch == "\\" then
          local esc = src:sub(j + 1, j + 1)
          if esc == "u" then
            local hex = src:match("^%x%x%x%x", j + 2)
            if not hex then return nil, "bad \\u escape at position " .. j end
            local cp = tonumber(hex, 16)
            if cp < 0x80 then
              buf[#buf + 1] = string.char(cp)
            elseif cp < 0x800 then
              buf[#buf + 1] = string.char(0xC0 + math.floor(cp / 64), 0x80 + cp % 64)
            else
              buf[#buf + 1] = string.char(0xE0 + math.floor(cp / 4096), 0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
            end
            j = j + 6
          else
            local map = { n = "\n", t = "\t", r = "\r", b = "\b", f = "\f" }
            buf[#buf + 1] = map[esc] or esc
            j = j + 2
          end
        else
          buf[#buf + 1] = ch
          j = j + 1
        end
      end
      push("string", table.concat(buf), i)
      i = j + 1
    else
      local two = src:sub(i, i + 1)
      if two == "<=" or two == ">=" or two == "<>" or two == "!=" then
        push("op", two, i)
        i = i + 2
      elseif c:match("[=<>%(%)%[%],%.%*%+%-/%%]") then
        push("op", c, i)
        i = i + 1
      else
        return nil, "unexpected character '" .. c .. "' at position " .. i
      end
    end
  end
  push("eof", nil, n + 1)
  return toks
end

---------------------------------------------------------------------------
-- Parser (recursive descent)

local Parser = {}
Parser.__index = Parser

local function kw(tok, word)
  return tok.t == "ident" and not tok.escaped and tok.v:lower() == word
end

function Parser:peek() return self.toks[self.i] end
function Parser:next()
  local t = self.toks[self.i]
  self.i = self.i + 1
  return t
end
function Parser:fail(msg, tok)
  tok = tok or self:peek()
  error({ query_error = msg .. " at position " .. tok.pos }, 0)
end
function Parser:expect_op(op)
  local t = self:next()
  if t.t ~= "op" or t.v ~= op then self:fail("expected '" .. op .. "'", t) end
  return t
end
function Parser:accept_kw(word)
  if kw(self:peek(), word) then return self:next() end
end
function Parser:is_op(op)
  local t = self:peek()
  return t.t == "op" and t.v == op
end

local FUNCTIONS = {
  is_defined = 1, is_null = 1, is_bool = 1, is_number = 1, is_string = 1, is_object = 1,
  is_array = 1, is_primitive = 1, startswith = 2, endswith = 2,
}

function Parser:literal()
  local t = self:next()
  if t.t == "string" or t.t == "number" then return t.v end
  if t.t == "op" and t.v == "-" then
    local num = self:next()
    if num.t ~= "number" then self:fail("expected a number after '-'", num) end
    return -num.v
  end
  if kw(t, "true") then return true end
  if kw(t, "false") then return false end
  if kw(t, "null") then return null end
  self:fail("expected a constant", t)
end

function Parser:list()
  local open = self:next()
  local close = open.v == "[" and "]" or ")"
  if open.t ~= "op" or (open.v ~= "[" and open.v ~= "(") then self:fail("expected '[' after IN", open) end
  local items = {}
  if not self:is_op(close) then
    repeat items[#items + 1] = self:literal() until not (self:is_op(",") and self:next())
  end
  self:expect_op(close)
  return items
end

function Parser:path(first)
  local segs = { first.v }
  while self:is_op(".") do
    self:next()
    local t = self:next()
    if t.t ~= "ident" then self:fail("expected a property name after '.'", t) end
    segs[#segs + 1] = t.v
  end
  return { k = "path", segs = segs }
end

function Parser:operand()
  local t = self:peek()
  if t.t == "op" and t.v == "(" then
    self:next()
    local e = self:expr()
    self:expect_op(")")
    return e
  end
  if t.t == "op" and t.v == "[" then return { k = "lit", v = self:list() } end
  if t.t == "string" or t.t == "number" or (t.t == "op" and t.v == "-") then
    return { k = "lit", v = self:literal() }
  end
  if t.t == "ident" and not t.escaped then
    local low = t.v:lower()
    if low == "true" or low == "false" or low == "null" then return { k = "lit", v = self:literal() } end
    if low == "undefined" then self:next(); return { k = "lit", v = UNDEF } end
    local nxt = self.toks[self.i + 1]
    if nxt.t == "op" and nxt.v == "(" then
      self:next(); self:next()
      local arity = FUNCTIONS[low]
      if not arity then
        self:fail("function '" .. t.v .. "' is not supported (IS_DEFINED, IS_NULL, IS_STRING, IS_NUMBER, "
          .. "IS_BOOL, IS_OBJECT, IS_ARRAY, IS_PRIMITIVE, STARTSWITH, ENDSWITH are)", t)
      end
      local args = {}
      if not self:is_op(")") then
        repeat args[#args + 1] = self:expr() until not (self:is_op(",") and self:next())
      end
      self:expect_op(")")
      if #args ~= arity then self:fail(t.v:upper() .. " takes " .. arity .. " argument(s)", t) end
      return { k = "call", name = low, args = args }
    end
  end
  if t.t == "ident" then
    self:next()
    return self:path(t)
  end
  self:fail("expected a property, constant or '('", t)
end

local CMP = { ["="] = true, ["!="] = true, ["<>"] = true, ["<"] = true, [">"] = true, ["<="] = true, [">="] = true }

function Parser:comparison()
  local a = self:operand()
  local t = self:peek()
  if t.t == "op" and CMP[t.v] then
    self:next()
    local op = t.v == "<>" and "!=" or t.v
    return { k = "cmp", op = op, a = a, b = self:operand() }
  end
  if t.t == "op" and (t.v == "+" or t.v == "-" or t.v == "*" or t.v == "/" or t.v == "%") then
    self:fail("arithmetic operators are not supported by the emulator", t)
  end
  if kw(t, "in") or kw(t, "nin") then
    self:next()
    return { k = "in", neg = kw(t, "nin"), a = a, list = self:list() }
  end
  if kw(t, "not") and kw(self.toks[self.i + 1], "in") then
    self:next(); self:next()
    return { k = "in", neg = true, a = a, list = self:list() }
  end
  return a
end

function Parser:unary()
  if self:accept_kw("not") then return { k = "not", e = self:unary() } end
  return self:comparison()
end

function Parser:conj()
  local e = self:unary()
  while self:accept_kw("and") do e = { k = "and", a = e, b = self:unary() } end
  return e
end

function Parser:expr()
  local e = self:conj()
  while self:accept_kw("or") do e = { k = "or", a = e, b = self:conj() } end
  return e
end

local function new_parser(src)
  if type(src) ~= "string" then return nil, "the query must be a string" end
  if #src > M.MAX_LENGTH then return nil, "the query is longer than " .. M.MAX_LENGTH .. " characters" end
  local toks, err = lex(src)
  if not toks then return nil, err end
  return setmetatable({ toks = toks, i = 1 }, Parser)
end

local function run(p, fn)
  local ok, res = pcall(fn, p)
  if ok then return res end
  if type(res) == "table" and res.query_error then return nil, res.query_error end
  error(res, 0)
end

function Parser:collection()
  local t = self:next()
  if not kw(t, "devices") then self:fail("FROM must name devices or devices.jobs", t) end
  local name = "devices"
  if self:is_op(".") then
    self:next()
    local sub = self:next()
    if kw(sub, "jobs") then
      name = "devices.jobs"
    elseif kw(sub, "modules") then
      self:fail("devices.modules is not supported by the emulator yet", sub)
    else
      self:fail("unknown collection devices." .. tostring(sub.v), sub)
    end
  end
  return name
end

function Parser:where_clause(plan)
  if self:accept_kw("where") then plan.where = self:expr() end
  local t = self:peek()
  if t.t ~= "eof" then
    if kw(t, "group") or kw(t, "order") then self:fail(t.v:upper() .. " BY is not supported by the emulator", t) end
    self:fail("unexpected '" .. tostring(t.v) .. "'", t)
  end
  return plan
end

function M.parse(sql)
  local p, err = new_parser(sql)
  if not p then return nil, err end
  return run(p, function(self)
    local plan = {}
    local t = self:next()
    if not kw(t, "select") then self:fail("a query starts with SELECT", t) end
    if self:accept_kw("top") then
      local paren = self:is_op("(") and self:next()
      local n = self:next()
      if n.t ~= "number" or n.v < 0 or n.v % 1 ~= 0 then self:fail("TOP needs a whole number", n) end
      if paren then self:expect_op(")") end
      plan.top = n.v
    end
    local star = self:next()
    if star.t ~= "op" or star.v ~= "*" then
      self:fail("only SELECT * is supported by the emulator (no projections or aggregates yet)", star)
    end
    t = self:next()
    if not kw(t, "from") then self:fail("expected FROM", t) end
    plan.collection = self:collection()
    return self:where_clause(plan)
  end)
end

-- A job's queryCondition: the WHERE body, "*" for all devices, or (as seen in the wild)
-- "FROM devices WHERE ...". A full SELECT is rejected, as the real service fails such jobs.
function M.parse_condition(cond)
  if type(cond) ~= "string" then return nil, "queryCondition must be a string" end
  if cond:match("^%s*%*%s*$") then return { collection = "devices" } end
  local p, err = new_parser(cond)
  if not p then return nil, err end
  return run(p, function(self)
    local plan = { collection = "devices" }
    if kw(self:peek(), "select") then
      self:fail("Unexpected character at input 'SELECT': queryCondition is only the WHERE clause", self:peek())
    end
    if kw(self:peek(), "from") then
      self:next()
      plan.collection = self:collection()
      if plan.collection ~= "devices" then self:fail("a job condition targets devices", self:peek()) end
      return self:where_clause(plan)
    end
    if self:peek().t == "eof" then self:fail("empty condition", self:peek()) end
    plan.where = self:expr()
    return self:where_clause(plan)
  end)
end

---------------------------------------------------------------------------
-- Evaluation (three-valued: true, false, UNDEF)

local function get_field(obj, name)
  if type(obj) ~= "table" or obj == null or getmetatable(obj) == core.json_array_mt then return UNDEF end
  local v = obj[name]
  if v ~= nil then return v end
  local low = name:lower() -- property names are case-insensitive
  for k, x in pairs(obj) do
    if type(k) == "string" and k:lower() == low then return x end
  end
  return UNDEF
end

local function resolve(plan, segs, doc)
  local start = 1
  if plan.collection == "devices.jobs" and #segs >= 2 and segs[1]:lower() == "devices"
    and segs[2]:lower() == "jobs" then
    start = 3
  end
  local cur = doc
  for i = start, #segs do
    cur = get_field(cur, segs[i])
    if cur == UNDEF then return UNDEF end
  end
  return cur
end

local function kind(v)
  if v == UNDEF then return "undefined" end
  if v == null then return "null" end
  local t = type(v)
  if t == "table" then return getmetatable(v) == core.json_array_mt and "array" or "object" end
  return t
end

local function primitive(k)
  return k == "string" or k == "number" or k == "boolean" or k == "null"
end

local eval

local function compare(op, a, b)
  local ka, kb = kind(a), kind(b)
  if not primitive(ka) or not primitive(kb) or ka ~= kb then return UNDEF end
  if op == "=" then return a == b end
  if op == "!=" then return a ~= b end
  if ka ~= "string" and ka ~= "number" then return UNDEF end
  if op == "<" then return a < b end
  if op == ">" then return a > b end
  if op == "<=" then return a <= b end
  return a >= b
end

local CALLS = {
  is_defined = function(v) return v ~= UNDEF end,
  is_null = function(v) return v == null end,
  is_bool = function(v) return type(v) == "boolean" end,
  is_number = function(v) return type(v) == "number" end,
  is_string = function(v) return type(v) == "string" end,
  is_object = function(v) return kind(v) == "object" end,
  is_array = function(v) return kind(v) == "array" end,
  is_primitive = function(v) return primitive(kind(v)) end,
  startswith = function(s, p)
    if type(s) ~= "string" or type(p) ~= "string" then return UNDEF end
    return s:sub(1, #p) == p
  end,
  endswith = function(s, p)
    if type(s) ~= "string" or type(p) ~= "string" then return UNDEF end
    return p == "" or s:sub(-#p) == p
  end,
}

eval = function(plan, node, doc)
  local k = node.k
  if k == "lit" then return node.v end
  if k == "path" then return resolve(plan, node.segs, doc) end
  if k == "cmp" then return compare(node.op, eval(plan, node.a, doc), eval(plan, node.b, doc)) end
  if k == "and" then
    local a = eval(plan, node.a, doc)
    if a == false then return false end
    local b = eval(plan, node.b, doc)
    if b == false then return false end
    if a == true and b == true then return true end
    return UNDEF
  end
  if k == "or" then
    local a = eval(plan, node.a, doc)
    if a == true then return true end
    local b = eval(plan, node.b, doc)
    if b == true then return true end
    if a == false and b == false then return false end
    return UNDEF
  end
  if k == "not" then
    local v = eval(plan, node.e, doc)
    if type(v) == "boolean" then return not v end
    return UNDEF
  end
  if k == "in" then
    local v = eval(plan, node.a, doc)
    if not primitive(kind(v)) then return UNDEF end
    local found = false
    for _, x in ipairs(node.list) do
      if compare("=", v, x) == true then found = true; break end
    end
    if node.neg then return not found end
    return found
  end
  if k == "call" then
    local args = {}
    for i, a in ipairs(node.args) do args[i] = eval(plan, a, doc) end
    return CALLS[node.name](args[1], args[2])
  end
  error("unknown node " .. tostring(k))
end

function M.matches(plan, doc)
  if not plan.where then return true end
  return eval(plan, plan.where, doc) == true
end

function M.filter(plan, docs)
  local out = {}
  for _, d in ipairs(docs) do
    if M.matches(plan, d) then
      out[#out + 1] = d
      if plan.top and #out >= plan.top then break end
    end
  end
  return out
end

return M
