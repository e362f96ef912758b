//! Schema migrations: the numbered files of `migrations/`, compiled in,
//! applied in order at start and recorded in `schema_migrations`.
//!
//! Safe when several nodes start at once: everything runs in one
//! transaction that first takes an advisory lock scoped to the schema, so
//! one node applies and the others then find nothing pending.

use tokio_postgres::Client;

/// (version, name, SQL), in order. Never edit an applied file; add one.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../../../migrations/0001_init.sql")),
    (
        2,
        "message_epoch",
        include_str!("../../../migrations/0002_message_epoch.sql"),
    ),
    (
        3,
        "room_grants",
        include_str!("../../../migrations/0003_room_grants.sql"),
    ),
    (
        4,
        "rooms_without_rows",
        include_str!("../../../migrations/0004_rooms_without_rows.sql"),
    ),
];

/// Applies pending migrations; returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('chatgate-migrate:' || current_schema()))",
        &[],
    )
    .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version     integer     PRIMARY KEY,
             name        text        NOT NULL,
             applied_at  timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut now = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        now.push(*version);
    }
    tx.commit().await?;
    Ok(now)
}
