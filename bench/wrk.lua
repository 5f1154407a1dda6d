-- wrk script of `make bench` (bench/run.py): POSTs one chat completion per request and checks
-- every response, so a run with a wrong answer is reported as invalid instead of as fast.
--
--   wrk ... -s bench/wrk.lua URL -- KEY BODY WANT_SUBSTRING WANT_TAIL WANT_RATELIMIT
--
-- KEY              the bearer key to send (the Tollgate client key, or the provider key when
--                  nothing in front of the provider swaps it)
-- BODY             the request body (JSON)
-- WANT_SUBSTRING   a string every good response body contains
-- WANT_TAIL        a string every good response body ends with ("" for none)
-- WANT_RATELIMIT   the x-ratelimit-limit-requests value every good response carries: the
--                  provider's own through a bare proxy, the client's budget through Tollgate
--
-- The request is built once per thread (no `request` function), so wrk spends nothing per
-- request on Lua except the `response` check, which runs after wrk has recorded the latency.
-- `done` prints one line, `BENCH_JSON {...}`, with the counts and latency percentiles in us.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  wrk.method = "POST"
  wrk.path = "/v1/chat/completions"
  wrk.headers["authorization"] = "Bearer " .. args[1]
  wrk.headers["content-type"] = "application/json"
  wrk.body = args[2]
  want_substring = args[3]
  want_tail = args[4] or ""
  want_ratelimit = args[5] or ""
  good = 0
  bad = 0
  first_bad = ""
end

local function is_good(status, headers, body)
  if status ~= 200 then
    return false
  end
  if not string.find(body, want_substring, 1, true) then
    return false
  end
  if want_tail ~= "" and string.sub(body, -#want_tail) ~= want_tail then
    return false
  end
  if want_ratelimit ~= "" and headers["x-ratelimit-limit-requests"] ~= want_ratelimit then
    return false
  end
  return true
end

function response(status, headers, body)
  if is_good(status, headers, body) then
    good = good + 1
  else
    bad = bad + 1
    if first_bad == "" then
      first_bad = status .. " " .. string.sub(body, 1, 300)
    end
  end
end

local function json_string(s)
  return '"' .. string.gsub(s, '[%c"\\]', function(c)
    return string.format("\\u%04x", string.byte(c))
  end) .. '"'
end

function done(summary, latency, requests)
  local total_good, total_bad, first = 0, 0, ""
  for _, t in ipairs(threads) do
    total_good = total_good + t:get("good")
    total_bad = total_bad + t:get("bad")
    local fb = t:get("first_bad")
    if first == "" and fb ~= nil then
      first = fb
    end
  end
  local e = summary.errors
  local fields = {
    string.format('"requests":%d', summary.requests),
    string.format('"duration_us":%d', summary.duration),
    string.format('"bytes":%d', summary.bytes),
    string.format('"good":%d', total_good),
    string.format('"bad":%d', total_bad),
    string.format('"first_bad":%s', json_string(first)),
    string.format('"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
      e.connect, e.read, e.write, e.status, e.timeout),
    string.format('"latency_us":{"min":%d,"mean":%.2f,"stdev":%.2f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p99_9":%d}',
      latency.min, latency.mean, latency.stdev, latency.max, latency:percentile(50),
      latency:percentile(90), latency:percentile(99), latency:percentile(99.9)),
  }
  io.write("BENCH_JSON {" .. table.concat(fields, ",") .. "}\n")
end
