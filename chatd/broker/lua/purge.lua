-- PURGE: delete a user's owed queue (chatctl queue purge, users delete).
-- KEYS: q, qo. Returns how many entries it held.

local n = math.max(redis.call('ZCARD', KEYS[2]), redis.call('HLEN', KEYS[1]))
redis.call('DEL', KEYS[1], KEYS[2])
return n
