//! Strict lowercase hex.
//!
//! Paracord decodes hex with `u8::from_str_radix`, which also takes upper case and `+X`
//! pairs, so one signature has many spellings and a re-spelled replay slips past a cache
//! keyed on the header text. parafed accepts exactly one spelling — lowercase, the exact
//! length — so every signature and key has one textual form.

/// Why a hex string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HexError {
    #[error("expected {expected} lowercase hex characters, got {got}")]
    Length { expected: usize, got: usize },
    #[error("only lowercase hex digits 0-9 and a-f are accepted")]
    Digit,
}

fn nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// Decodes exactly `N` bytes from `2 * N` lowercase hex characters.
pub fn decode_exact<const N: usize>(s: &str) -> Result<[u8; N], HexError> {
    let bytes = s.as_bytes();
    if bytes.len() != 2 * N {
        return Err(HexError::Length {
            expected: 2 * N,
            got: bytes.len(),
        });
    }
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = nibble(pair[0]).ok_or(HexError::Digit)?;
        let lo = nibble(pair[1]).ok_or(HexError::Digit)?;
        out[i] = (hi << 4) | lo;
    }
    Ok(out)
}

/// Lowercase hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict() {
        assert_eq!(decode_exact::<2>("0aff").unwrap(), [0x0a, 0xff]);
        assert_eq!(decode_exact::<2>("0AFF"), Err(HexError::Digit));
        assert_eq!(decode_exact::<2>("+aff"), Err(HexError::Digit));
        assert!(matches!(
            decode_exact::<2>("0af"),
            Err(HexError::Length { .. })
        ));
        assert_eq!(encode(&[0xab, 0x01]), "ab01");
    }
}
