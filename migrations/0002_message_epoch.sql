-- chatgate schema, version 2: the room stream's epoch is recorded with
-- each message's sequence number. A retried send is answered with the
-- position it was published at, which is only meaningful with its epoch
-- (a room stream that was lost continues under a new one).
ALTER TABLE messages ADD COLUMN epoch bigint NOT NULL DEFAULT 0;
