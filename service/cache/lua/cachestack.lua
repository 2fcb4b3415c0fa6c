#!lua name=cachestack
-- The cache's functions in Redis: what every read and write does there, each one atomic.
-- Redis loads this library as its admin when it starts (docker/redis/cachestack-redis); the
-- service's Redis user may call these functions (FCALL) and may run no Lua of its own.
-- service/cache/scripts.py names them; docs/design.md says why each step is there.
--
-- Every function takes the epoch key as KEYS[1] and the epoch the caller believes in as
-- ARGV[1]. When they differ it changes nothing and answers {'epoch', <the current one>}: an
-- entry of an older epoch is never read, and a command of one is never applied.
--
-- A user's entry is '<version> <json>', '<version> ' for a deleted user or '0 ' for an id
-- nobody has (service/cache/entry.py). A put writes one entry in one of five modes
-- (service/cache/scripts.py, Mode): 'store-unless-older' (SET, unless the key holds a higher
-- version; no version counts as 0), 'store' (SET whatever it holds), 'delete' (DEL), and the
-- change stream's 'delete-older' (DEL, unless the key holds this version or a higher one:
-- the write-through of the same change got there first) and 'delete-other' (DEL, unless the
-- key holds exactly this value: a pointer to the changed user).

local function version(value) return tonumber(string.match(value, '^(%d+) ')) or 0 end

-- Whether a key already holds what a change the stream reports left there.
local function current_for(mode, current, value)
  if mode == 'delete-older' then return version(current) >= version(value) end
  return current == value
end

local function put(key, mode, ttl, value)
  if mode == 'delete' then redis.call('DEL', key) return end
  if mode == 'delete-older' or mode == 'delete-other' then
    local current = redis.call('GET', key)
    if not (current and current_for(mode, current, value)) then redis.call('DEL', key) end
    return
  end
  if mode == 'store-unless-older' then
    local current = redis.call('GET', key)
    if current and version(current) > version(value) then return end
  end
  redis.call('SET', key, value, 'PX', ttl)
end

-- A lease holds a reader's or a writer's token, or the change stream's mark 'stream <version>':
-- what it leaves on the entry of a user it reported changed to that version. The mark stops
-- every fill begun before it (its token is gone), but not the write-through of that change or
-- of a later one, and any reader may take its place.
local function stream_mark(lease)
  return lease and tonumber(string.match(lease, '^stream (%d+)$'))
end

local function take_lease(key, token, ms)
  if redis.call('SET', key, token, 'NX', 'PX', ms) then return true end
  if stream_mark(redis.call('GET', key)) then
    redis.call('SET', key, token, 'PX', ms)
    return true
  end
  return false
end

local function other_epoch(keys, args)
  local current = redis.call('GET', keys[1])
  if current ~= args[1] then return {'epoch', current or ''} end
end

-- epoch: the epoch to use now. KEYS[1] the epoch key; ARGV[1] an epoch the caller lived
-- through a gap in (commands of it may have been lost, or may still arrive late), which must
-- not be current when this returns, or '' for none; ARGV[2] a fresh random name, used when a
-- new epoch must begin; ARGV[3] the Sentinels' configuration the caller found this server
-- the primary in (0 without Sentinels; it grows with every failover). An epoch is
-- '<run_id>:<configuration>:<name>': one of another run of Redis (a restart, or a replica
-- promoted in a failover), or of an earlier configuration (a server promoted again, which
-- missed what was written on the one promoted in between), is never current.
local function epoch(keys, args)
  local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
  local configuration = tonumber(args[3] or '0')
  local current = redis.call('GET', keys[1])
  if current and current ~= args[1] then
    local run, since = string.match(current, '^(%x+):(%d+):')
    if run == run_id and tonumber(since) >= configuration then return current end
  end
  local new = run_id .. ':' .. configuration .. ':' .. args[2]
  redis.call('SET', keys[1], new)
  return new
end

-- A miss: {'lease', timeline} when this reader took the lease of the key (KEYS[3]), else
-- {'busy', timeline}; the timeline is the newest Postgres timeline a write-through recorded
-- (KEYS[4]; '0' for none), on which or a later one the reader must read Postgres: a server of
-- an older one is a leader deposed since, which lacks acknowledged writes.
local function missed(keys, args)
  local timeline = redis.call('GET', keys[4]) or '0'
  if take_lease(keys[3], args[2], args[3]) then return {'lease', timeline} end
  return {'busy', timeline}
end

-- read: a user's entry by id, or the lease to fill it. KEYS[2] the entry, KEYS[3] its lease,
-- KEYS[4] the timeline key; ARGV[2] this reader's lease token, ARGV[3] how long a lease
-- lasts, in ms. Answers {'hit', value} when the entry is there (a user, a tombstone or
-- nobody's); else {'lease', timeline} when this reader took the lease (it reads Postgres,
-- then fills), {'busy', timeline} when another reader holds it (missed).
local function read(keys, args)
  local stale = other_epoch(keys, args)
  if stale then return stale end
  local value = redis.call('GET', keys[2])
  if value then return {'hit', value} end
  return missed(keys, args)
end

-- follow: a user by username or email, following the pointer to the user's entry; or the
-- lease to fill the pointer. KEYS[2] the pointer (username:<lowered> or email:<lowered>,
-- holding an id, or '' for nobody), KEYS[3] its lease, KEYS[4] the timeline key; ARGV[2] this reader's lease token,
-- ARGV[3] how long a lease lasts in ms, ARGV[4] the prefix of the users' entries (...:id:),
-- ARGV[5] the field, 'username' or 'email', ARGV[6] its lowered value. Answers {'hit', ''}
-- when nobody has the value; {'hit', entry} when the pointer leads to a user who still has
-- it; else, as read, {'lease', timeline} or {'busy', timeline}. A pointer to an entry that is gone, or to a
-- user who no longer has the value, is a miss, never a wrong answer.
local function follow(keys, args)
  local stale = other_epoch(keys, args)
  if stale then return stale end
  local id = redis.call('GET', keys[2])
  if id == '' then return {'hit', ''} end
  if id then
    local row = redis.call('GET', args[4] .. id)
    local body = row and string.match(row, '^%d+ (.+)$')
    if body and string.lower(cjson.decode(body)[args[5]]) == args[6] then
      return {'hit', row}
    end
  end
  return missed(keys, args)
end

-- fill: store what a reader found in Postgres, only while its lease is still there (no
-- write, flush or new epoch came in between: each deletes the leases of what it touches).
-- KEYS[2] the reader's lease, KEYS[3..] the entries; ARGV[2] the reader's lease token,
-- ARGV[3..] mode, ttl in ms and value of each entry in turn. Answers 1 when it wrote the
-- entries and gave the lease back, 0 when the lease was gone or another's.
local function fill(keys, args)
  local stale = other_epoch(keys, args)
  if stale then return stale end
  if redis.call('GET', keys[2]) ~= args[2] then return 0 end
  redis.call('DEL', keys[2])
  for i = 3, #keys do put(keys[i], args[3*i-6], args[3*i-5], args[3*i-4]) end
  return 1
end

-- write: a write-through (or the auditor's repair, or the change stream's invalidation):
-- write n entries, delete every lease on them, announce each user it changed to the near
-- caches, and record the Postgres timeline the writer committed on. KEYS[2] the timeline
-- key, KEYS[3..n+2] the entries, KEYS[n+3..2n+2] their leases in the same order,
-- KEYS[2n+3..] changed:<id> of each user among the entries, set and deleted at once (the
-- near caches' listeners hear of it, nothing is kept); ARGV[2] the writer's lease token on
-- its user's entry ('' for none: a create, a repair), ARGV[3] the writer's timeline (kept
-- unless the key holds a later one), ARGV[4..] mode, ttl in ms and value of each entry in
-- turn. An entry to 'store-unless-older' whose lease is no longer the writer's own is
-- deleted instead (the writer cannot know what came in between), unless all that came is
-- the stream's mark of this version or an older one. A 'delete-older' leaves the stream's
-- mark on the entry's lease for ttl ms. Answers 1.
local function write(keys, args)
  local stale = other_epoch(keys, args)
  if stale then return stale end
  if tonumber(args[3]) > tonumber(redis.call('GET', keys[2]) or '0') then
    redis.call('SET', keys[2], args[3])
  end
  local n = (#args - 3) / 3
  for i = 1, n do
    local mode, ttl, value = args[3*i+1], args[3*i+2], args[3*i+3]
    if mode == 'store-unless-older' and args[2] ~= '' then
      local lease = redis.call('GET', keys[n+2+i])
      local mark = stream_mark(lease)
      if lease ~= args[2] and not (mark and mark <= version(value)) then mode = 'delete' end
    end
    put(keys[2+i], mode, ttl, value)
    if mode == 'delete-older' then
      redis.call('SET', keys[n+2+i], 'stream ' .. version(value), 'PX', ttl)
    else
      redis.call('DEL', keys[n+2+i])
    end
  end
  for i = 2*n + 3, #keys do
    redis.call('SET', keys[i], '')
    redis.call('DEL', keys[i])
  end
  return 1
end

-- lease: a writer takes the lease of the entry it is about to change (KEYS[2]) with its
-- token (ARGV[2]) for ARGV[3] ms, whoever held it; or gives it back when ARGV[2] is ''.
-- Answers 1.
local function lease(keys, args)
  local stale = other_epoch(keys, args)
  if stale then return stale end
  if args[2] == '' then
    redis.call('DEL', keys[2])
  else
    redis.call('SET', keys[2], args[2], 'PX', args[3])
  end
  return 1
end

redis.register_function('cachestack_epoch', epoch)
redis.register_function('cachestack_read', read)
redis.register_function('cachestack_follow', follow)
redis.register_function('cachestack_fill', fill)
redis.register_function('cachestack_write', write)
redis.register_function('cachestack_lease', lease)
