//! Which addresses a request to a *discovered* peer may reach: public ones only.
//!
//! A peer's address comes from its name (resolved by DNS) and from its
//! `/.well-known/paracord/server` document (`federation_endpoint` may be any absolute
//! URL). Both are the peer's to choose, and any peer can make this server look up a name
//! (an event names its origin). Without a check, a name that resolves to `127.0.0.1`, or
//! a document that points at `http://169.254.169.254/`, would make parafed send its
//! requests into its own network — to its Redis, its Postgres, a cloud metadata service
//! (server-side request forgery). So a request whose host is not an operator's own
//! (`[peers]` base URLs, or every host with `federation.allow_private_addresses`)
//! connects only to public addresses: an IP literal is checked before the request, a
//! name's resolved addresses when connecting ([`PublicResolver`], so a name that
//! resolves differently later — DNS rebinding — is checked again each time).
//!
//! "Public" means outside the IANA special-purpose address registries (RFC 6890 and
//! its updates: RFC 8190 for IPv4, RFC 6890 §2.2.3 for IPv6) that are not globally
//! reachable: loopback, private (RFC 1918), shared (RFC 6598), link-local, unique local
//! (RFC 4193), documentation, benchmarking, multicast, reserved, unspecified. IPv6
//! forms that embed an IPv4 address (mapped, NAT64 well-known prefix, 6to4) are judged
//! by the embedded address.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};

/// Whether `ip` is globally reachable (see the module doc for the ranges left out).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0 // "this network" (RFC 791)
        || ip.is_private() // 10/8, 172.16/12, 192.168/16 (RFC 1918)
        || ip.is_loopback() // 127/8
        || ip.is_link_local() // 169.254/16
        || (a == 100 && (b & 0xc0) == 64) // 100.64/10, shared (RFC 6598)
        || (a == 192 && b == 0 && c == 0) // 192.0.0/24, IETF protocol assignments
        || ip.is_documentation() // 192.0.2/24, 198.51.100/24, 203.0.113/24 (RFC 5737)
        || (a == 192 && b == 88 && c == 99) // 192.88.99/24, 6to4 relay anycast (RFC 7526)
        || (a == 198 && (b & 0xfe) == 18) // 198.18/15, benchmarking (RFC 2544)
        || ip.is_multicast() // 224/4
        || a >= 240) // 240/4 reserved, and 255.255.255.255
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4); // ::ffff:0:0/96
    }
    let s = ip.segments();
    // 64:ff9b::/96, the NAT64 well-known prefix (RFC 6052): the last 32 bits.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_public_v4(embedded_v4(s[6], s[7]));
    }
    // 64:ff9b:1::/48, local-use NAT64 (RFC 8215): translates into the local network.
    if s[..3] == [0x64, 0xff9b, 1] {
        return false;
    }
    // 2002::/16, 6to4 (RFC 3056): the 32 bits after the prefix.
    if s[0] == 0x2002 {
        return is_public_v4(embedded_v4(s[1], s[2]));
    }
    !(ip.is_unspecified() // ::
        || ip.is_loopback() // ::1
        || ip.is_multicast() // ff00::/8
        || ip.is_unique_local() // fc00::/7 (RFC 4193)
        || ip.is_unicast_link_local() // fe80::/10
        || (s[0] & 0xffc0) == 0xfec0 // fec0::/10, deprecated site-local (RFC 3879)
        || s[..4] == [0x100, 0, 0, 0] // 100::/64, discard-only (RFC 6666)
        || (s[0] == 0x2001 && s[1] < 0x200) // 2001::/23, IETF protocol assignments
        || (s[0] == 0x2001 && s[1] == 0xdb8) // 2001:db8::/32, documentation (RFC 3849)
        || (s[0] == 0x3fff && s[1] < 0x1000) // 3fff::/20, documentation (RFC 9637)
        || s[0] == 0x5f00 // 5f00::/16, SRv6 SIDs (RFC 9602)
        || (s[..5] == [0, 0, 0, 0, 0] && s[5] == 0)) // ::/96, IPv4-compatible (deprecated)
}

fn embedded_v4(hi: u16, lo: u16) -> Ipv4Addr {
    let [a, b] = hi.to_be_bytes();
    let [c, d] = lo.to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// Why a request to a discovered peer was not made: its host is, or resolves only to,
/// addresses that are not public ([`is_public`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "{what}; a discovered peer must be reachable on the internet — put a peer of your own \
     network under [peers] or set federation.allow_private_addresses"
)]
pub struct NotPublic {
    /// What was refused, e.g. `127.0.0.1 is a non-public address (loopback, …)` or
    /// `localhost resolves only to non-public addresses (127.0.0.1, ::1)`.
    pub what: String,
}

impl NotPublic {
    /// An IP literal in a URL.
    pub fn literal(host: &str) -> Self {
        Self {
            what: format!(
                "{host} is a non-public address (loopback, private, link-local or another \
                 special-purpose range)"
            ),
        }
    }

    /// A name whose resolved addresses are all non-public (at most the first eight
    /// listed).
    pub fn name(host: &str, resolved: &[IpAddr]) -> Self {
        let list: Vec<String> = resolved.iter().take(8).map(IpAddr::to_string).collect();
        Self {
            what: format!(
                "{host} resolves only to non-public addresses ({})",
                list.join(", ")
            ),
        }
    }
}

/// The system resolver (`getaddrinfo`, as hyper's own), keeping only public addresses:
/// a name that resolves to none fails with [`NotPublic`]. The connector tries the
/// addresses it returns and no others.
#[derive(Clone)]
pub struct PublicResolver {
    inner: GaiResolver,
}

impl PublicResolver {
    pub fn new() -> Self {
        Self {
            inner: GaiResolver::new(),
        }
    }
}

impl Default for PublicResolver {
    fn default() -> Self {
        Self::new()
    }
}

/// Addresses a name resolved to, public ones only.
pub type PublicAddrs = std::vec::IntoIter<SocketAddr>;

type Resolving = Pin<
    Box<dyn Future<Output = Result<PublicAddrs, Box<dyn std::error::Error + Send + Sync>>> + Send>,
>;

impl tower_service::Service<Name> for PublicResolver {
    type Response = PublicAddrs;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Resolving;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower_service::Service::<Name>::poll_ready(&mut self.inner, cx).map_err(Into::into)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let host = name.as_str().to_owned();
        let resolving = tower_service::Service::<Name>::call(&mut self.inner, name);
        Box::pin(async move {
            let (public, inward): (Vec<SocketAddr>, Vec<SocketAddr>) =
                resolving.await?.partition(|a| is_public(a.ip()));
            if public.is_empty() {
                let inward: Vec<IpAddr> = inward.iter().map(SocketAddr::ip).collect();
                return Err(Box::new(NotPublic::name(&host, &inward))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(public.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_purpose_addresses_are_not_public_and_others_are() {
        let not_public = [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "127.255.255.255",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe", // NAT64 of 169.254.169.254
            "2002:7f00:1::",      // 6to4 of 127.0.0.1
            "2002:c0a8:101::1",   // 6to4 of 192.168.1.1
            "100::1",
            "2001::1",
            "2001:db8::1",
            "3fff::1",
            "3fff:fff::1",
            "5f00::1",
            "64:ff9b:1::a00:1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
        ];
        for a in not_public {
            assert!(!is_public(a.parse().unwrap()), "{a} should not be public");
        }
        let public = [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.255.255",
            "172.32.0.1",
            "192.0.1.1",
            "192.169.0.1",
            "198.17.255.255",
            "198.20.0.1",
            "223.255.255.255",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808", // NAT64 of 8.8.8.8
            "2002:808:808::1",  // 6to4 of 8.8.8.8
            "2001:200::1",
            "3ffe::1",
            "4000::1",
            "2606:4700::1111",
            "2a00:1450:4001::1",
        ];
        for a in public {
            assert!(is_public(a.parse().unwrap()), "{a} should be public");
        }
    }

    #[tokio::test]
    async fn a_name_that_resolves_only_inward_is_refused() {
        use tower_service::Service;
        let mut r = PublicResolver::new();
        let name: Name = "localhost".parse().unwrap();
        std::future::poll_fn(|cx| r.poll_ready(cx)).await.unwrap();
        let err = r.call(name).await.expect_err("localhost must be refused");
        let text = err.to_string();
        assert!(
            text.contains("localhost resolves only to non-public addresses (")
                && text.contains("[peers]"),
            "{text}"
        );
    }
}
