-- write.lua: a write-through (or a repair): write n entries, delete every lease on them, and
-- announce each user it changed to the near caches.
-- KEYS[1..n]      the entries
-- KEYS[n+1..2n]   their leases, in the same order
-- KEYS[2n+1..]    changed:<id> of each user among the entries, set and deleted at once: the
--                 near caches' listeners hear of it (CLIENT TRACKING), nothing is kept
-- ARGV[1]         the writer's lease token on its user's entry, '' for none (a create, a
--                 repair)
-- ARGV[2..]       mode, ttl in ms and value of each entry in turn (entry.lua)
-- An entry to 'store-unless-older' whose lease is no longer the writer's own is deleted
-- instead: the writer cannot know what came in between.
-- Reply: 1.
local n = (#ARGV - 1) / 3
for i = 1, n do
  local mode = ARGV[3*i-1]
  if mode == 'store-unless-older' and ARGV[1] ~= ''
      and redis.call('GET', KEYS[n+i]) ~= ARGV[1] then
    mode = 'delete'
  end
  put(KEYS[i], mode, ARGV[3*i], ARGV[3*i+1])
  redis.call('DEL', KEYS[n+i])
end
for i = 2*n + 1, #KEYS do
  redis.call('SET', KEYS[i], '')
  redis.call('DEL', KEYS[i])
end
return 1
