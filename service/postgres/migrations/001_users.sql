-- Users: identity data only. `version` grows by one on every change; the cache
-- uses it to refuse writing an older row over a newer one.
CREATE TABLE IF NOT EXISTS users (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username     varchar(32)  NOT NULL,
    email        varchar(254) NOT NULL,
    display_name varchar(100),
    version      bigint       NOT NULL DEFAULT 1,
    created_at   timestamptz  NOT NULL DEFAULT now(),
    updated_at   timestamptz  NOT NULL DEFAULT now()
);
-- Emails are lower-cased by the service before they get here.
CREATE UNIQUE INDEX IF NOT EXISTS users_username_key ON users (lower(username));
CREATE UNIQUE INDEX IF NOT EXISTS users_email_key ON users (email);

-- Cache keys whose write-through failed (Redis unreachable after a commit). They are
-- deleted from Redis as soon as it answers again, so a Redis that comes back with
-- old data never serves it.
CREATE TABLE IF NOT EXISTS cache_repairs (
    key        text        PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);
