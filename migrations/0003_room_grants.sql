-- chatgate schema, version 3: who may enter a room.
-- A channel_members row is the user's room list entry (what a fresh
-- session joins) and, when role is set, the application's grant of
-- membership (server API). A client's Leave clears `listed` and keeps the
-- grant; only the server API removes a grant.
ALTER TABLE channel_members
    ADD COLUMN listed     boolean     NOT NULL DEFAULT true,
    ADD COLUMN role       text,
    ADD COLUMN granted_at timestamptz;
