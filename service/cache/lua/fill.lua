-- fill.lua: store what a reader found in Postgres, only while its lease is still there (no
-- write and no flush came in between: each deletes the leases of what it touches).
-- KEYS[1]       the reader's lease
-- KEYS[2..]     the entries to write
-- ARGV[1]       the reader's lease token
-- ARGV[2..]     mode, ttl in ms and value of each entry in turn (entry.lua)
-- Reply: 1 when it wrote the entries and gave the lease back; 0 when the lease was gone or
--        another's, and it wrote nothing.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
for i = 2, #KEYS do put(KEYS[i], ARGV[3*i-4], ARGV[3*i-3], ARGV[3*i-2]) end
return 1
