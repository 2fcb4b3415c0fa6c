-- entry.lua: put(key, mode, ttl, value), which fill.lua and write.lua use to write each of
-- their entries. Not a script by itself: service/cache/scripts.py puts it in front of both.
-- A mode says how the entry is written (service/cache/scripts.py, Mode):
--   'store-unless-older'  SET value PX ttl, unless the key holds a higher version (values
--                         are '<version> <json>' or '<version> '; no version counts as 0);
--   'store'               SET value PX ttl, whatever the key holds;
--   'delete'              DEL key.
local function version(value) return tonumber(string.match(value, '^(%d+) ')) or 0 end
local function put(key, mode, ttl, value)
  if mode == 'delete' then redis.call('DEL', key) return end
  if mode == 'store-unless-older' then
    local current = redis.call('GET', key)
    if current and version(current) > version(value) then return end
  end
  redis.call('SET', key, value, 'PX', ttl)
end
