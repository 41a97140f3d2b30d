-- SETTLE: take delivered entries out of a user's owed queue; a key that is
-- not there is ignored.
-- KEYS: q, qo. ARGV: keys to remove.

for i = 1, #ARGV do
  redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[1], ARGV[i])
end
return 0
