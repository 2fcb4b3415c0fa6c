-- The repair log is gone: a write-through that failed now moves the cache to a new epoch
-- (service/cache/trust.py), which makes every entry it could have left behind unreachable at
-- once, where the log deleted them key by key before Redis was trusted again.
DROP TABLE IF EXISTS cache_repairs;
