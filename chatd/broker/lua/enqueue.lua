-- ENQUEUE: queue items without publishing (chatctl queue requeue).
-- KEYS: q, qo. ARGV: queue limit, queue ttl, then key, payload, ...
-- Queues each key not queued yet, in order (as ROUTE does, without
-- publishing). Returns how many keys were new.
-- needs: _queue.lua

local top = nil
local added = 0
for i = 3, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    top = next_arrival(KEYS[2], top)
    redis.call('ZADD', KEYS[2], string.format('%.0f', top), ARGV[i])
    added = added + 1
  end
end
if added > 0 then
  trim_queue(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]))
end
return added
