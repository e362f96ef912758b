-- Seeds one channel with 1,000,000 messages (and reactions and
-- attachments on every 10th) for `chatgate-loadtest history`.
-- psql "$CHAT_DATABASE_URL" -v room=history-1m -f loadtest/seed_history.sql
\set ON_ERROR_STOP on
INSERT INTO users (id, name, image)
SELECT 'seed-' || i, 'Seed User ' || i, 'https://i.example/' || i || '.png'
FROM generate_series(0, 99) i
ON CONFLICT DO NOTHING;
INSERT INTO channels (name) VALUES (:'room') ON CONFLICT DO NOTHING;
INSERT INTO messages (channel, sender_id, sender_name, client_msg_id, body, seq, created_at)
SELECT :'room', 'seed-' || (i % 100), 'Seed User ' || (i % 100), 'seed-' || :'room' || '-' || i,
       'seeded message number ' || i || ', about as long as a chat line usually is', i,
       timestamptz '2026-01-01' + i * interval '1 second'
FROM generate_series(1, 1000000) i;
INSERT INTO reactions (message_id, emoji, user_id)
SELECT m.id, e.emoji, 'seed-' || u.u
FROM messages m, (VALUES ('👍'), ('🎉')) e(emoji), generate_series(0, 2) u(u)
WHERE m.channel = :'room' AND m.seq % 10 = 0;
INSERT INTO attachments (message_id, position, url, name, mime, size)
SELECT m.id, 0, 'https://cdn.example/' || m.id, 'file-' || m.id || '.png', 'image/png', 1000 + m.seq
FROM messages m WHERE m.channel = :'room' AND m.seq % 10 = 0;
ANALYZE messages; ANALYZE reactions; ANALYZE attachments;
