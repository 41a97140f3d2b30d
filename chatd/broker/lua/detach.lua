-- DETACH: remove a connection of a user.
-- KEYS: conns, seen. ARGV: conn, ts, last-seen ttl.
-- {0} if the connection was unknown; otherwise {1, field, value, ...} with the
-- connections left (none: this was the last, and ts became last-seen).
-- needs: _set_seen.lua

if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
  return {0}
end
local rest = redis.call('HGETALL', KEYS[1])
if #rest == 0 then
  set_seen(KEYS[2], tonumber(ARGV[2]), ARGV[3])
end
table.insert(rest, 1, 1)
return rest
