-- chatgate schema, version 1.
-- Applied by the storage crate at start, inside a transaction holding an
-- advisory lock, so several nodes starting together apply it once.

CREATE TABLE users (
    id          text        PRIMARY KEY,
    name        text        NOT NULL,
    image       text        NOT NULL DEFAULT '',
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE channels (
    name        text        PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE channel_members (
    user_id     text        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    channel     text        NOT NULL REFERENCES channels (name) ON DELETE CASCADE,
    joined_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, channel)
);
-- "who is in this channel" (the primary key serves "which channels is this user in").
CREATE INDEX channel_members_by_channel ON channel_members (channel, user_id);

-- Messages keep the sender's name and avatar as of sending (what live
-- recipients saw); history shows the current profile when there is one.
-- No foreign key to channels: a send stays one index-light INSERT, and
-- channel rows are created on first join.
CREATE TABLE messages (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel        text        NOT NULL,
    sender_id      text        NOT NULL,
    sender_name    text        NOT NULL,
    sender_image   text        NOT NULL DEFAULT '',
    client_msg_id  text        NOT NULL,
    body           text        NOT NULL,
    -- room sequence number, set right after the event is published
    seq            bigint      NOT NULL DEFAULT 0,
    -- millisecond precision so the (created_at, id) cursor is exact
    created_at     timestamptz NOT NULL DEFAULT date_trunc('milliseconds', clock_timestamp()),
    -- idempotent sends: a retry finds the original
    CONSTRAINT messages_idempotency UNIQUE (sender_id, client_msg_id)
);
-- keyset pagination: newest first within a channel
CREATE INDEX messages_history ON messages (channel, created_at DESC, id DESC);

CREATE TABLE reactions (
    message_id  bigint      NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    emoji       text        NOT NULL,
    user_id     text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (message_id, emoji, user_id)
);

-- Deferred: attachments are inserted in the same statement as their
-- message, so the check runs at commit.
CREATE TABLE attachments (
    message_id  bigint   NOT NULL REFERENCES messages (id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    position    smallint NOT NULL,
    url         text     NOT NULL,
    name        text     NOT NULL,
    mime        text     NOT NULL,
    size        bigint   NOT NULL,
    PRIMARY KEY (message_id, position)
);
