-- ROTATE: rotate a refresh-token family, or spot a reused refresh token.
-- KEYS: the family. ARGV: digest presented, new digest, new access token
-- id, until (ms). Returns {outcome, user, access token id before}; a reused
-- digest deletes the family.

local v = redis.call('HMGET', KEYS[1], 'user', 'digest', 'jti')
if not v[1] then
  return {'unknown', false, false}
end
if v[2] ~= ARGV[1] then
  redis.call('DEL', KEYS[1])
  return {'reused', v[1], v[3]}
end
redis.call('HSET', KEYS[1], 'digest', ARGV[2], 'jti', ARGV[3])
redis.call('PEXPIREAT', KEYS[1], ARGV[4])
return {'rotated', v[1], v[3]}
