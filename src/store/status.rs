//! Counts for the status overview (`/_parafed/admin/v1/status`, `parafed admin status`).

use std::collections::BTreeMap;

use diesel::dsl::count_star;
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::schema::{destination_health as dh, federation_events as fe, outbound_queue as oq};
use super::StoreError;

#[derive(Debug, serde::Serialize)]
pub struct Counts {
    pub events: BTreeMap<String, i64>,
    pub outbound: BTreeMap<String, i64>,
    pub destinations: BTreeMap<String, i64>,
}

pub async fn counts(conn: &mut AsyncPgConnection) -> Result<Counts, StoreError> {
    let events: Vec<(String, i64)> = fe::table
        .group_by(fe::status)
        .select((fe::status, count_star()))
        .load(conn)
        .await?;
    let outbound: Vec<(String, i64)> = oq::table
        .group_by(oq::status)
        .select((oq::status, count_star()))
        .load(conn)
        .await?;
    let destinations: Vec<(String, i64)> = dh::table
        .group_by(dh::state)
        .select((dh::state, count_star()))
        .load(conn)
        .await?;
    Ok(Counts {
        events: events.into_iter().collect(),
        outbound: outbound.into_iter().collect(),
        destinations: destinations.into_iter().collect(),
    })
}
