-- wrk script for benchmarks/serving.py --load: POST /predict with real photos as multipart uploads,
-- a share of them malformed, counting answers by status class per wrk thread.
-- Environment: PHOTOS (a file listing photo paths, one per line), MALFORMED (fraction, e.g. 0.1), SEED.

local boundary = "finetuneloadtest"
local threads = {}

local function read(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

local function multipart(name, data)
  return "--" .. boundary .. "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" .. name ..
    "\"\r\nContent-Type: application/octet-stream\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"
end

function setup(thread)
  table.insert(threads, thread)
  thread:set("id", #threads)
end

function init(args)
  math.randomseed(tonumber(os.getenv("SEED") or "0") + id)
  malformed_share = tonumber(os.getenv("MALFORMED") or "0")
  good, bad, paths = {}, {}, {}
  for path in io.lines(os.getenv("PHOTOS")) do
    table.insert(paths, path)
    table.insert(good, multipart(path:match("[^/]+$"), read(path)))
  end
  local photo = read(paths[1])
  local noise = {}
  for i = 1, 4096 do noise[i] = string.char(math.random(0, 255)) end
  bad = {
    multipart("notes.jpg", "this is text, not a JPEG"),                 -- not an image
    multipart("cut.jpg", photo:sub(1, math.floor(#photo / 3))),           -- truncated JPEG
    multipart("empty.jpg", ""),                                          -- empty file
    multipart("noise.jpg", "\255\216" .. table.concat(noise)),            -- JPEG magic, then noise
    "",                                                                 -- empty body
    multipart("big.jpg", string.rep("x", 11 * 1024 * 1024)),             -- over max_upload_mb=10
  }
  counts = {ok = 0, client_error = 0, server_error = 0, other = 0, malformed_sent = 0}
end

function request()
  local body
  if math.random() < malformed_share then
    body = bad[math.random(#bad)]
    counts.malformed_sent = counts.malformed_sent + 1
  else
    body = good[math.random(#good)]
  end
  return wrk.format("POST", "/predict", {["Content-Type"] = "multipart/form-data; boundary=" .. boundary}, body)
end

function response(status, headers, body)
  if status >= 200 and status < 300 then counts.ok = counts.ok + 1
  elseif status >= 400 and status < 500 then counts.client_error = counts.client_error + 1
  elseif status >= 500 then counts.server_error = counts.server_error + 1
  else counts.other = counts.other + 1 end
end

function done(summary, latency, requests)
  local total = {ok = 0, client_error = 0, server_error = 0, other = 0, malformed_sent = 0}
  for _, thread in ipairs(threads) do
    local c = thread:get("counts")
    for k, v in pairs(c) do total[k] = total[k] + v end
  end
  io.write(string.format(
    "RESULT requests=%d seconds=%.3f ok=%d client_error=%d server_error=%d other=%d malformed_sent=%d " ..
    "socket_errors=%d p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f max_ms=%.2f\n",
    summary.requests, summary.duration / 1e6, total.ok, total.client_error, total.server_error, total.other,
    total.malformed_sent, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3))
end
