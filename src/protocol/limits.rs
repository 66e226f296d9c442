//! Bounds on event content, as Paracord v0.8.5 enforces them.
//!
//! Content is free-form JSON from a peer. These bounds keep one event from costing
//! unbounded memory, stack or storage: the content's serialised size, its nesting depth
//! (the content object itself is level 1; Paracord accepts exactly 32 levels) and the
//! number of entries in any one array or object.

use serde_json::Value;

/// Largest serialised content, in bytes.
pub const MAX_CONTENT_BYTES: usize = 1_048_576;
/// Deepest nesting of arrays and objects, the content value itself counting as 1.
pub const MAX_CONTENT_DEPTH: usize = 32;
/// Most entries in one array or object.
pub const MAX_CONTENT_ENTRIES: usize = 10_000;
/// Largest request body the federation API reads (PROTOCOL.md: over 2 MiB → 413).
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// Which bound content broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("content serialises to {0} bytes; the limit is 1048576")]
    TooLarge(usize),
    #[error("content is nested deeper than 32 levels")]
    TooDeep,
    #[error("an array or object in content has more than 10000 entries")]
    TooManyEntries,
}

/// Checks depth and entry counts without recursion deeper than the limit allows.
pub fn check_shape(v: &Value) -> Result<(), LimitError> {
    fn walk(v: &Value, depth: usize) -> Result<(), LimitError> {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(a) => {
                if a.len() > MAX_CONTENT_ENTRIES {
                    return Err(LimitError::TooManyEntries);
                }
                Box::new(a.iter())
            }
            Value::Object(o) => {
                if o.len() > MAX_CONTENT_ENTRIES {
                    return Err(LimitError::TooManyEntries);
                }
                Box::new(o.values())
            }
            _ => return Ok(()),
        };
        if depth > MAX_CONTENT_DEPTH {
            return Err(LimitError::TooDeep);
        }
        for c in children {
            walk(c, depth + 1)?;
        }
        Ok(())
    }
    walk(v, 1)
}

/// Checks every content bound; `serialised_len` is the length of the content's
/// serialisation (the caller usually has it already from building signing bytes).
pub fn check_content(v: &Value, serialised_len: usize) -> Result<(), LimitError> {
    check_shape(v)?;
    if serialised_len > MAX_CONTENT_BYTES {
        return Err(LimitError::TooLarge(serialised_len));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(levels: usize) -> Value {
        let mut v = json!({"v": 0});
        for _ in 1..levels {
            v = json!({ "d": v });
        }
        v
    }

    #[test]
    fn depth_bound_matches_paracord() {
        assert_eq!(check_shape(&nested(32)), Ok(()));
        assert_eq!(check_shape(&nested(33)), Err(LimitError::TooDeep));
        assert_eq!(check_shape(&json!("a string")), Ok(()));
    }

    #[test]
    fn entry_bound() {
        let ok = Value::Array(vec![Value::Null; 10_000]);
        assert_eq!(check_shape(&json!({ "a": ok })), Ok(()));
        let bad = Value::Array(vec![Value::Null; 10_001]);
        assert_eq!(
            check_shape(&json!({ "a": bad })),
            Err(LimitError::TooManyEntries)
        );
    }

    #[test]
    fn size_bound() {
        let v = json!({});
        assert_eq!(check_content(&v, MAX_CONTENT_BYTES), Ok(()));
        assert!(check_content(&v, MAX_CONTENT_BYTES + 1).is_err());
    }
}
