-- read.lua: a user's entry by id, or the lease to fill it.
-- KEYS[1]  the entry, id:<id>
-- KEYS[2]  its lease, lease:id:<id>
-- ARGV[1]  this reader's lease token
-- ARGV[2]  how long a lease lasts, in ms
-- Reply: {'hit', value} when the entry is there (a user, a tombstone or nobody's);
--        {'lease'} when it is not and this reader took the lease (it reads Postgres, then
--        fills); {'busy'} when another reader holds the lease.
local value = redis.call('GET', KEYS[1])
if value then return {'hit', value} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'lease'} end
return {'busy'}
