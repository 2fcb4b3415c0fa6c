-- One wrk script for every bench workload, so every server is driven by the same client code.
-- Arguments (after `--`):
--   paths FILE THREADS [OFFSET]  GET the paths in FILE from line OFFSET on (0-based), each thread
--                                walking its own share in order (no path repeats until the share
--                                runs out; then it wraps and `wraps` says so)
--   create STYLE THREADS TAG     POST a user with a unique username and email on every request;
--                                STYLE "ours" posts /users, "peer" posts / (with a password)
-- done() prints one line "BENCH {json}" with the figures. Every request carries the bearer token
-- on the first line of the file BENCH_TOKEN_FILE names, when it is set (our service asks for an
-- API token): a file, so that the token is in no environment or command line.

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local function load_paths(file, nthreads, offset)
  local mine, n = {}, 0
  for line in io.lines(file) do
    if n >= offset and (n - offset) % nthreads == tid then
      mine[#mine + 1] = wrk.format("GET", line, headers)
    end
    n = n + 1
  end
  return mine
end

local function authorization()
  local name = os.getenv("BENCH_TOKEN_FILE")
  if not name then
    return nil
  end
  local file = assert(io.open(name))
  local token = file:read("*l")
  file:close()
  return "Bearer " .. token
end

function init(args)
  mode = args[1]
  pos, wraps = 0, 0
  headers = { Authorization = authorization() }
  if mode == "paths" then
    reqs = load_paths(args[2], tonumber(args[3]), tonumber(args[4] or "0"))
  elseif mode == "create" then
    style, tag = args[2], args[4] .. "t" .. tid .. "n"
    headers["Content-Type"] = "application/json"
  else
    error("unknown mode " .. tostring(mode))
  end
end

function request()
  pos = pos + 1
  if mode == "paths" then
    if pos > #reqs then
      pos, wraps = 1, wraps + 1
    end
    return reqs[pos]
  end
  local name = tag .. pos
  if style == "ours" then
    return wrk.format("POST", "/users", headers,
      '{"username":"' .. name .. '","email":"' .. name .. '@example.com"}')
  end
  return wrk.format("POST", "/", headers,
    '{"username":"' .. name .. '","email":"' .. name .. '@example.com","password":"secret123"}')
end

function done(summary, latency, requests)
  local max_pos, total_wraps = 0, 0
  for _, thread in ipairs(threads) do
    max_pos = math.max(max_pos, thread:get("pos") or 0)
    total_wraps = total_wraps + (thread:get("wraps") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"status_errors":%d,' ..
    '"socket_errors":%d,"max_pos":%d,"wraps":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout, max_pos, total_wraps))
end
