//! The one place errors become HTTP answers.
//!
//! Every error body has Paracord's shape, `{"code","details":null,"error","message"}`:
//! `code` for machines (`FORBIDDEN`, `RATE_LIMITED`, …), `error` a short summary,
//! `message` what happened and what to do about it. 429 and 503 carry `Retry-After`.
//! Internal failures are logged with detail and answered without it.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::protocol::envelope::EnvelopeError;
use crate::protocol::transport::TransportError;
use crate::queue::QueueError;
use crate::remote::KeyLookupError;
use crate::store::StoreError;

pub type Body = Full<Bytes>;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", m)
    }
    pub fn unauthorized(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", m)
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "FORBIDDEN", m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "CONFLICT", m)
    }
    pub fn unprocessable(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "UNPROCESSABLE_ENTITY", m)
    }
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self {
            retry_after_secs: Some(retry_after_secs.max(1)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "RATE_LIMITED",
                format!(
                    "too many requests from this server; retry after {} s",
                    retry_after_secs.max(1)
                ),
            )
        }
    }
    /// The peer has as many requests in flight here as it may (`trust::in_flight`).
    pub fn too_many_in_flight() -> Self {
        Self {
            retry_after_secs: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "RATE_LIMITED",
                "too many requests from this server in flight at once; retry after 1 s",
            )
        }
    }
    /// A dependency (Postgres, Redis) is down: the request changed nothing; try again.
    pub fn unavailable(what: &str) -> Self {
        Self {
            retry_after_secs: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                format!("{what} is temporarily unavailable; nothing was stored, retry later"),
            )
        }
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            "method not allowed on this path",
        )
    }
    pub fn unsupported_media_type(m: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            m,
        )
    }
    pub fn payload_too_large(m: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", m)
    }
    pub fn length_required(m: impl Into<String>) -> Self {
        Self::new(StatusCode::LENGTH_REQUIRED, "LENGTH_REQUIRED", m)
    }
    pub fn request_timeout(m: impl Into<String>) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "REQUEST_TIMEOUT", m)
    }
    /// A peer we had to ask could not be reached (the local API's outbound requests).
    pub fn peer_unreachable(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "PEER_UNREACHABLE", m)
    }

    fn summary(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "bad request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::NOT_FOUND => "not found",
            StatusCode::METHOD_NOT_ALLOWED => "method not allowed",
            StatusCode::REQUEST_TIMEOUT => "request timeout",
            StatusCode::LENGTH_REQUIRED => "length required",
            StatusCode::CONFLICT => "conflict",
            StatusCode::PAYLOAD_TOO_LARGE => "payload too large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported media type",
            StatusCode::UNPROCESSABLE_ENTITY => "unprocessable entity",
            StatusCode::TOO_MANY_REQUESTS => "rate limited",
            StatusCode::BAD_GATEWAY => "bad gateway",
            StatusCode::SERVICE_UNAVAILABLE => "service unavailable",
            _ => "internal server error",
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let body = serde_json::json!({
            "code": self.code,
            "details": null,
            "error": self.summary(),
            "message": self.message,
        });
        let mut r = json_response(self.status, &body);
        if let Some(s) = self.retry_after_secs {
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    json_bytes_response(status, serde_json::to_vec(body).unwrap_or_default())
}

pub fn json_bytes_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(ref m) | StoreError::Transient(ref m) => {
                tracing::warn!(error = %m, "database unavailable or busy");
                ApiError::unavailable("the database")
            }
            StoreError::Conflict(m) => ApiError::conflict(m),
            StoreError::NotFound(m) => ApiError::not_found(m),
            other => {
                tracing::error!(error = %other, "database error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "INTERNAL_ERROR",
                    "internal error; it has been logged",
                )
            }
        }
    }
}

impl From<crate::app::AppError> for ApiError {
    fn from(e: crate::app::AppError) -> Self {
        use crate::app::AppError;
        match e {
            AppError::Store(s) => s.into(),
            AppError::Queue(q) => q.into(),
            AppError::NoSigningKey => Self {
                retry_after_secs: Some(60),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "NO_SIGNING_KEY",
                    "this server has no active signing key; run `parafed keys generate`",
                )
            },
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        tracing::warn!(error = %e, "redis unavailable");
        ApiError::unavailable("the job queue")
    }
}

impl From<TransportError> for ApiError {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::BadSignature | TransportError::MalformedSignature(_) => {
                ApiError::forbidden(e.to_string())
            }
            _ => ApiError::unauthorized(e.to_string()),
        }
    }
}

impl From<KeyLookupError> for ApiError {
    fn from(e: KeyLookupError) -> Self {
        match e {
            KeyLookupError::UnknownKey { .. } => ApiError::forbidden(format!(
                "{e}; the key must be listed in the server's /_paracord/federation/v1/keys"
            )),
            KeyLookupError::Unavailable(_) => ApiError::unavailable("the key store"),
            // Not 403: a Paracord sender treats 403 as final; the peer's keys may be
            // back in a moment.
            KeyLookupError::Unreachable { .. } => Self {
                retry_after_secs: Some(30),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "KEYS_UNREACHABLE",
                    format!("{e}; nothing was stored, retry later"),
                )
            },
        }
    }
}

impl From<EnvelopeError> for ApiError {
    fn from(e: EnvelopeError) -> Self {
        match e {
            EnvelopeError::Shape(_) => ApiError::unprocessable(e.to_string()),
            _ => ApiError::bad_request(e.to_string()),
        }
    }
}

impl From<crate::admin::AdminError> for ApiError {
    fn from(e: crate::admin::AdminError) -> Self {
        match e {
            crate::admin::AdminError::BadRequest(m) => ApiError::bad_request(m),
            crate::admin::AdminError::NotFound(m) => ApiError::not_found(m),
            crate::admin::AdminError::Conflict(m) => ApiError::conflict(m),
            crate::admin::AdminError::Store(s) => s.into(),
            crate::admin::AdminError::Queue(q) => q.into(),
        }
    }
}
