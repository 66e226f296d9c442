//! The admin API (bearer `PARAFED_ADMIN_TOKEN`), under `/_parafed/admin/v1/`. The status
//! overview for now; queue and peer operations live here as they are built.

use http::{Response, StatusCode};

use super::error::{json_response, ApiError, Body};
use crate::app::App;
use crate::queue::QueueName;
use crate::store::{self, StoreError};

pub async fn status(app: &App) -> Result<Response<Body>, ApiError> {
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    let counts = store::status::counts(&mut conn).await?;
    let active_key = store::keys::active(&mut conn)
        .await?
        .map(|k| k.key_id().to_string());
    let mut queues = serde_json::Map::new();
    for q in QueueName::ALL {
        let len = app.queue.len(q).await.ok();
        queues.insert(
            q.as_str().to_owned(),
            len.map_or(serde_json::Value::Null, Into::into),
        );
    }
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "server_name": app.cfg.server_name,
            "version": env!("CARGO_PKG_VERSION"),
            "active_key": active_key,
            "events": counts.events,
            "outbound": counts.outbound,
            "destinations": counts.destinations,
            "queues": queues,
        }),
    ))
}
