-- rateLimit v2.0.0: one GCRA decision, atomically, in one round trip.
--
-- KEYS[1]  the client's key (prefixed, hashed identifier)
-- ARGV[1]  emission interval T in microseconds (1e6 / requestsPerSecond), integer
-- ARGV[2]  burst B (requests allowed at once), integer >= 1
-- ARGV[3]  cost C of this request in units (default 1); 0 only checks the bucket
-- ARGV[4]  '1': charge C whatever the bucket holds (a cost already spent; never denied)
--
-- The key holds the client's theoretical arrival time (TAT, microseconds on the
-- Redis server's clock, so every engine of a fleet shares one clock). A request
-- is allowed when TAT + T - B*T <= now, and then TAT becomes max(TAT, now) + T.
-- The key expires when TAT passes: by then the bucket is full again, which is
-- exactly what a missing key means, so expiry never hands an over-limit client
-- a fresh bucket and Redis keeps only clients that are still refilling.
--
-- Returns {allowed (0|1), remaining, retry_after_us, reset_us}:
--   remaining       requests still allowed right now after this one
--   retry_after_us  (denied only) wait until one request is allowed
--   reset_us        wait until the bucket is full again
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3] or 1)
local charge = ARGV[4] == '1'
local tat = tonumber(redis.call('GET', KEYS[1]) or 0) or 0
if tat < now then
  tat = now
end
local new_tat = tat + cost * interval
local allow_at = new_tat - burst * interval
if now < allow_at and not charge then
  return {0, 0, allow_at - now, tat - now}
end
if cost > 0 then
  local ttl_ms = math.ceil((new_tat - now) / 1000)
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl_ms)
end
return {1, math.max(0, math.floor((now - allow_at) / interval)), 0, new_tat - now}
