-- Helpers of the owed queue, for the scripts that queue items (ROUTE, ENQUEUE).
-- An entry's score in qo is its arrival time in microseconds (Redis's clock),
-- bumped to stay above the newest entry's, so the order is the arrival order
-- and the oldest entry's age can be read. (Queues written before scores were
-- times hold small arrival numbers; new entries still sort after them.)
-- Scores are formatted as integers: Lua would print a 16-digit number in
-- exponent form and lose digits.
--
-- next_arrival(qo, top): the score of the next entry (top: the last one given,
-- or nil to read the newest). trim_queue(q, qo, limit, ttl): drop the oldest
-- entries beyond limit, then refresh both keys' ttl.

local function next_arrival(qo, top)
  if top == nil then
    local last = redis.call('ZRANGE', qo, -1, -1, 'WITHSCORES')
    top = tonumber(last[2] or '0')
  end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  return math.max(top + 1, now)
end
local function trim_queue(q, qo, limit, ttl)
  local over = redis.call('ZCARD', qo) - limit
  if over > 0 then
    local gone = redis.call('ZPOPMIN', qo, over)
    for j = 1, #gone, 2 do
      redis.call('HDEL', q, gone[j])
    end
  end
  redis.call('EXPIRE', q, ttl)
  redis.call('EXPIRE', qo, ttl)
end
