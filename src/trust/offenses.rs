//! Automatic quarantine: a peer that crosses a threshold of offences within a window is
//! quarantined — its inbound events stored but held, outbound to it held — with the
//! reason and the counts recorded, until it expires (`federation.quarantine_secs`) or an
//! operator releases it (`quarantine_secs = 0`).
//!
//! Offences, each counted per peer in Redis (one fixed window per kind, fleet-wide):
//! bad transport signatures, bad envelope signatures, events the verify job rejected,
//! replayed requests, and relays a peer was not entitled to make.
//!
//! Attribution: a bad *transport* signature is counted against the origin the request
//! names, which whoever sent it chose — so anyone can push a peer towards quarantine by
//! sending garbage in its name. Quarantine only holds traffic (nothing is lost, an
//! operator releases it in one command) and a peer an operator has explicitly allowed is
//! never quarantined automatically; set `federation.quarantine_threshold = 0` to turn
//! the automatic quarantine off. The other offences come from requests the peer itself
//! signed.

use chrono::Utc;

use crate::protocol::ServerName;
use crate::store::{self, StoreError};

use super::decisions::{self, NewDecision};
use super::Trust;

/// Counts one offence in a fixed window that starts with the window's first offence.
const COUNT: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
";

/// Who the audit trail names for an automatic decision.
pub const AUTOMATIC_ACTOR: &str = "parafed (automatic)";

/// Something a peer did that counts towards automatic quarantine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offense {
    BadTransportSignature,
    BadEnvelopeSignature,
    RejectedEvent,
    Replay,
    ForgedRelay,
}

impl Offense {
    pub const ALL: [Offense; 5] = [
        Offense::BadTransportSignature,
        Offense::BadEnvelopeSignature,
        Offense::RejectedEvent,
        Offense::Replay,
        Offense::ForgedRelay,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Offense::BadTransportSignature => "bad_transport_signature",
            Offense::BadEnvelopeSignature => "bad_envelope_signature",
            Offense::RejectedEvent => "rejected_event",
            Offense::Replay => "replay",
            Offense::ForgedRelay => "forged_relay",
        }
    }
}

/// The peer's offence counts in the current windows, by kind.
pub async fn counts(
    trust: &Trust,
    peer: &str,
) -> Result<Vec<(&'static str, u64)>, crate::queue::QueueError> {
    let keys: Vec<String> = Offense::ALL
        .iter()
        .map(|o| trust.keys.offenses(peer, o.as_str()))
        .collect();
    let mut c = trust.redis.clone();
    let vals: Vec<Option<u64>> = redis::cmd("MGET").arg(keys).query_async(&mut c).await?;
    Ok(Offense::ALL
        .iter()
        .zip(vals)
        .map(|(o, v)| (o.as_str(), v.unwrap_or(0)))
        .collect())
}

/// Counts one offence of `peer`; quarantines it when the count reaches the threshold.
/// Never fails the caller: a Redis or database error is logged and the offence lost.
pub async fn record(trust: &Trust, peer: &ServerName, offense: Offense) {
    let threshold = trust.rule.threshold;
    if threshold == 0 || *peer == trust.server_name {
        return;
    }
    let key = trust.keys.offenses(peer.as_str(), offense.as_str());
    let window_ms = trust.rule.window_secs.max(1) * 1000;
    let mut c = trust.redis.clone();
    // One script, so the window's expiry is set with its first count, whatever fails.
    let r: Result<u64, _> = redis::Script::new(COUNT)
        .key(&key)
        .arg(window_ms)
        .invoke_async(&mut c)
        .await;
    let n = match r {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(error = %e, "counting an offence failed");
            return;
        }
    };
    // Exactly once per window, however many processes count at the same time.
    if n == u64::from(threshold) {
        if let Err(e) = quarantine(trust, peer, offense, n).await {
            tracing::warn!(peer = %peer, error = %e, "automatic quarantine failed");
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum QuarantineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
}

async fn quarantine(
    trust: &Trust,
    peer: &ServerName,
    offense: Offense,
    n: u64,
) -> Result<(), QuarantineError> {
    let mut conn = trust.pool.get().await.map_err(StoreError::from)?;
    let now = Utc::now();
    if let Some(d) = decisions::get(&mut conn, peer.as_str()).await? {
        let live = d.until.is_none_or(|u| u > now);
        // An operator's allow stands, and a peer already blocked or quarantined stays so.
        if live && matches!(d.state.as_str(), "allow" | "block" | "quarantine") {
            return Ok(());
        }
    }
    let counts = counts(trust, peer.as_str()).await?;
    let counts_json = serde_json::to_string(
        &counts
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect::<std::collections::BTreeMap<_, _>>(),
    )
    .unwrap_or_default();
    let window = trust.rule.window_secs;
    let reason = format!(
        "automatic: {n} {} within {window} s",
        offense.as_str().replace('_', " ")
    );
    let until = match trust.rule.quarantine_secs {
        0 => None,
        s => Some(now + chrono::Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1000))),
    };
    decisions::set(
        &mut conn,
        peer.as_str(),
        &NewDecision {
            state: "quarantine",
            reason: Some(&reason),
            until,
            automatic: true,
            set_by: AUTOMATIC_ACTOR,
            offenses: Some(&counts_json),
        },
    )
    .await?;
    store::audit::record(
        &mut conn,
        &store::audit::Entry {
            actor: AUTOMATIC_ACTOR,
            action: "peers.quarantine",
            target: Some(peer.as_str()),
            filter: Some(&counts_json),
            count: i64::try_from(n).unwrap_or(i64::MAX),
        },
    )
    .await?;
    drop(conn);
    trust.changed().await?;
    tracing::warn!(peer = %peer, %reason, "peer quarantined automatically");
    Ok(())
}
