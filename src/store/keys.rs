//! Our signing keys in Postgres.
//!
//! Exactly one key is active (a unique partial index enforces it, so two operators
//! rotating at once cannot both win). Rotation retires the active key and creates a new
//! one in one transaction; a retired key stays published and verifiable until
//! `verify_until`, so events signed just before the rotation still verify at peers.

use chrono::{DateTime, Duration, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use super::schema::local_signing_keys as t;
use super::StoreError;
use crate::protocol::{KeyId, Keypair};

/// A stored key, without its secret: what `parafed keys list` shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    pub key_id: String,
    pub algorithm: &'static str,
    pub public_key: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub retired_at: Option<DateTime<Utc>>,
    pub verify_until: Option<DateTime<Utc>>,
}

#[derive(Queryable)]
struct Row {
    key_id: String,
    seed: Vec<u8>,
    public_key: String,
    status: String,
    created_at: DateTime<Utc>,
    retired_at: Option<DateTime<Utc>>,
    verify_until: Option<DateTime<Utc>>,
}

impl Row {
    fn info(&self) -> KeyInfo {
        KeyInfo {
            key_id: self.key_id.clone(),
            algorithm: "ed25519",
            public_key: self.public_key.clone(),
            status: self.status.clone(),
            created_at: self.created_at,
            retired_at: self.retired_at,
            verify_until: self.verify_until,
        }
    }

    fn keypair(&self) -> Result<Keypair, StoreError> {
        let key_id = KeyId::parse(&self.key_id)
            .map_err(|e| StoreError::Corrupt(format!("key {}: {e}", self.key_id)))?;
        let seed: [u8; 32] = self.seed.as_slice().try_into().map_err(|_| {
            StoreError::Corrupt(format!("key {}: seed is not 32 bytes", self.key_id))
        })?;
        Ok(Keypair::from_seed(key_id, seed))
    }
}

const COLUMNS: (
    t::key_id,
    t::seed,
    t::public_key,
    t::status,
    t::created_at,
    t::retired_at,
    t::verify_until,
) = (
    t::key_id,
    t::seed,
    t::public_key,
    t::status,
    t::created_at,
    t::retired_at,
    t::verify_until,
);

/// A fresh key id, `ed25519:<8 random hex>`.
pub fn fresh_key_id() -> KeyId {
    let n: u32 = rand::random();
    // `ed25519:` + 8 hex digits always parses.
    KeyId::parse(&format!("ed25519:{n:08x}")).unwrap_or_else(|_| unreachable!())
}

fn is_unique_violation(e: &diesel::result::Error) -> bool {
    matches!(
        e,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)
    )
}

/// Creates the first active key. Fails with `Conflict` when one already exists (use
/// [`rotate`] to replace it).
pub async fn generate(
    conn: &mut AsyncPgConnection,
    key_id: Option<KeyId>,
) -> Result<KeyInfo, StoreError> {
    let kp = Keypair::generate(key_id.unwrap_or_else(fresh_key_id));
    insert_active(conn, &kp).await
}

/// Imports an existing seed (for example a Paracord key file) as the active key.
pub async fn import(conn: &mut AsyncPgConnection, kp: &Keypair) -> Result<KeyInfo, StoreError> {
    insert_active(conn, kp).await
}

async fn insert_active(conn: &mut AsyncPgConnection, kp: &Keypair) -> Result<KeyInfo, StoreError> {
    let row: Row = diesel::insert_into(t::table)
        .values((
            t::key_id.eq(kp.key_id().as_str()),
            t::seed.eq(kp.seed().to_vec()),
            t::public_key.eq(kp.public_key_hex()),
            t::status.eq("active"),
        ))
        .returning(COLUMNS)
        .get_result(conn)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!(
                    "cannot create key {}: an active key already exists or the id is taken; \
                     use `parafed keys rotate` to replace the active key",
                    kp.key_id()
                ))
            } else {
                e.into()
            }
        })?;
    Ok(row.info())
}

/// Every key, newest first.
pub async fn list(conn: &mut AsyncPgConnection) -> Result<Vec<KeyInfo>, StoreError> {
    let rows: Vec<Row> = t::table
        .select(COLUMNS)
        .order((t::created_at.desc(), t::key_id.asc()))
        .load(conn)
        .await?;
    Ok(rows.iter().map(Row::info).collect())
}

/// The active signing key, if any.
pub async fn active(conn: &mut AsyncPgConnection) -> Result<Option<Keypair>, StoreError> {
    let row: Option<Row> = t::table
        .select(COLUMNS)
        .filter(t::status.eq("active"))
        .first(conn)
        .await
        .optional()?;
    row.map(|r| r.keypair()).transpose()
}

/// Keys to publish in `/keys` and to verify our own signatures with: the active key and
/// retired keys whose `verify_until` is still ahead.
pub async fn published(
    conn: &mut AsyncPgConnection,
    now: DateTime<Utc>,
) -> Result<Vec<KeyInfo>, StoreError> {
    let rows: Vec<Row> = t::table
        .select(COLUMNS)
        .filter(t::status.eq("active").or(t::verify_until.gt(now)))
        .order(t::created_at.desc())
        .load(conn)
        .await?;
    Ok(rows.iter().map(Row::info).collect())
}

/// Retires the active key (kept verifiable for `retention`) and makes a new active key.
/// Returns `(retired, new)`. With no active key, it simply creates one.
pub async fn rotate(
    conn: &mut AsyncPgConnection,
    new_id: Option<KeyId>,
    retention: Duration,
) -> Result<(Option<KeyInfo>, KeyInfo), StoreError> {
    let kp = Keypair::generate(new_id.unwrap_or_else(fresh_key_id));
    conn.transaction::<_, StoreError, _>(async move |conn| {
        let now = Utc::now();
        let retired: Option<Row> = diesel::update(t::table.filter(t::status.eq("active")))
            .set((
                t::status.eq("retired"),
                t::retired_at.eq(now),
                t::verify_until.eq(now + retention),
            ))
            .returning(COLUMNS)
            .get_result(conn)
            .await
            .optional()?;
        let new = insert_active(conn, &kp).await?;
        Ok((retired.map(|r| r.info()), new))
    })
    .await
}
