-- follow.lua: a user by username or email, following the pointer to the user's entry; or
-- the lease to fill the pointer.
-- KEYS[1]  the pointer, username:<lowered> or email:<lowered>; it holds an id, or '' for
--          nobody
-- KEYS[2]  its lease
-- ARGV[1]  this reader's lease token
-- ARGV[2]  how long a lease lasts, in ms
-- ARGV[3]  the prefix of the users' entries (...:id:)
-- ARGV[4]  the field, 'username' or 'email'
-- ARGV[5]  its lowered value
-- Reply: {'hit', ''} when nobody has the value; {'hit', entry} when the pointer leads to a
--        user who still has it; else, as read.lua, {'lease'} or {'busy'}. A pointer to an
--        entry that is gone, or to a user who no longer has the value, is a miss, never a
--        wrong answer.
local id = redis.call('GET', KEYS[1])
if id == '' then return {'hit', ''} end
if id then
  local row = redis.call('GET', ARGV[3] .. id)
  local body = row and string.match(row, '^%d+ (.+)$')
  if body and string.lower(cjson.decode(body)[ARGV[4]]) == ARGV[5] then return {'hit', row} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'lease'} end
return {'busy'}
