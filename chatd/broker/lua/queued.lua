-- QUEUED: read a user's owed queue (read-only; nothing leaves on read).
-- KEYS: q, qo. Returns the queue, oldest first, as a flat list
-- key, payload, score, ...

local flat = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local out = {}
for i = 1, #flat, 1000 do
  local chunk = {}
  local scores = {}
  for j = i, math.min(i + 999, #flat), 2 do
    chunk[#chunk + 1] = flat[j]
    scores[#scores + 1] = flat[j + 1]
  end
  local values = redis.call('HMGET', KEYS[1], unpack(chunk))
  for j = 1, #chunk do
    if values[j] then
      out[#out + 1] = chunk[j]
      out[#out + 1] = values[j]
      out[#out + 1] = scores[j]
    end
  end
end
return out
