//! The test harness: throwaway Postgres and Redis servers (`parafed::devservers`, started
//! from the installed binaries on free loopback ports, never the machine's own services),
//! parafed instances and fake peers on 127.0.0.1, and a raw HTTP client for requests no
//! well-behaved client would send.
#![allow(dead_code)]

pub mod app;
pub mod pg;
pub mod redis;

/// Polls `f` until it returns `Some`; panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: std::time::Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    parafed::devservers::wait_until(what, timeout, f)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}
