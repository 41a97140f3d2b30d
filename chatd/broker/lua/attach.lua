-- ATTACH: list a connection of a user.
-- KEYS: conns. ARGV: conn, incarnation, conns ttl.
-- Adds the connection; returns the hash as it was before (flat field, value).

local before = redis.call('HGETALL', KEYS[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return before
