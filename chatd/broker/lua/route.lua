-- ROUTE: queue a user's owed items and publish the user's items to the other
-- nodes that hold a connection of the user. One call per user (one slot).
-- KEYS: conns, q, qo. ARGV: the user's channel prefix, queue limit, queue
-- ttl, user, skip (incarnations that deliver locally, each between spaces),
-- publish command (SPUBLISH, or PUBLISH where Redis has no sharded pub/sub),
-- then per item: key, payload, queued ("1"/"0"), exclude ("" for none).
-- Queues the owed items (once per key, oldest dropped beyond the limit) and
-- publishes the items once to the user's channel of each other incarnation
-- holding a connection of the user. The channels carry the user's hash tag:
-- on a cluster the script and its publishes stay on the user's shard.
-- Returns the number of channels published to.
-- needs: _queue.lua

local limit = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local skip = ARGV[5]
local queued = false
local top = nil
for i = 7, #ARGV, 4 do
  if ARGV[i + 2] == '1' then
    if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
      top = next_arrival(KEYS[3], top)
      redis.call('ZADD', KEYS[3], string.format('%.0f', top), ARGV[i])
    end
    queued = true
  end
end
if queued then
  trim_queue(KEYS[2], KEYS[3], limit, ttl)
end
local incs = redis.call('HVALS', KEYS[1])
if #incs == 0 then
  return 0
end
local message = nil
local done = {}
local count = 0
for _, inc in ipairs(incs) do
  if not done[inc] and not string.find(skip, ' ' .. inc .. ' ', 1, true) then
    done[inc] = true
    if message == nil then
      local items = {}
      for i = 7, #ARGV, 4 do
        items[#items + 1] = {ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]}
      end
      message = cjson.encode({u = ARGV[4], i = items})
    end
    redis.call(ARGV[6], ARGV[1] .. inc, message)
    count = count + 1
  end
end
return count
