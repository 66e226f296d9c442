//! The throwaway Redis of `parafed::devservers`, for tests.
#![allow(unused_imports)]

pub use parafed::devservers::redis::command_line;
pub use parafed::devservers::Redis;
