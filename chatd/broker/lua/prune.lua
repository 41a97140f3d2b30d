-- PRUNE: remove connections that belong to dead incarnations.
-- KEYS: conns, seen. ARGV: ts, last-seen ttl, then field, expected value, ...
-- Removes each field still holding the expected value (a connection of a dead
-- incarnation, or one whose detach failed); when that empties the hash and ts
-- is positive, ts becomes last-seen. Returns the connections left.
-- needs: _set_seen.lua

local removed = 0
for i = 3, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    removed = removed + 1
  end
end
local left = redis.call('HLEN', KEYS[1])
local ts = tonumber(ARGV[1])
if removed > 0 and left == 0 and ts > 0 then
  set_seen(KEYS[2], ts, ARGV[2])
end
return left
