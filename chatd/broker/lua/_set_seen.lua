-- Helper of the presence scripts that may end a user's last connection
-- (DETACH, PRUNE). set_seen(key, ts, ttl): ts becomes last-seen, only forward.

local function set_seen(key, ts, ttl)
  local cur = redis.call('GET', key)
  if (not cur) or ts > tonumber(cur) then
    redis.call('SET', key, ts, 'EX', ttl)
  end
end
