-- chatgate schema, version 4: a room a client only joins leaves no row.
-- A channels row is a room the application created or granted members of
-- (server API). A client's Join writes only its room-list entry, so
-- joining and leaving names (made-up ones included) leaves nothing behind
-- once they are left. Without the foreign key, deleting a room deletes
-- its member rows itself.
ALTER TABLE channel_members DROP CONSTRAINT IF EXISTS channel_members_channel_fkey;
