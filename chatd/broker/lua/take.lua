-- TAKE: a token bucket on Redis's clock (the same arithmetic as
-- chatd.core.ratelimit.fill_and_take): refill, take up to want whole tokens,
-- remember; the key expires once it would be full again.
-- KEYS: the bucket. ARGV: want, rate (tokens/s), burst.
-- Returns {taken, ms until a token is there}.

local want = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local v = redis.call('HMGET', KEYS[1], 'n', 'at')
local tokens = tonumber(v[1]) or burst
local at = tonumber(v[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local taken = math.max(0, math.min(want, math.floor(tokens)))
tokens = tokens - taken
redis.call('HSET', KEYS[1], 'n', tostring(tokens), 'at', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
local wait = 0
if taken == 0 then
  wait = math.ceil((1 - tokens) / rate * 1000)
end
return {taken, wait}
