//! IP allow-lists: CIDR blocks (`10.0.0.0/8`, `2001:db8::/32`, or a single address).

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::SecurityError;

/// An address block.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, what a dual-stack socket reports) are
/// matched as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

impl Cidr {
    /// Whether `ip` is in the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (a, width) = bits(self.addr);
        let (b, other) = bits(canonical(ip));
        if width != other {
            return false;
        }
        let shift = u32::from(width - self.prefix);
        shift >= 128 || (a >> shift) == (b >> shift)
    }
}

impl std::str::FromStr for Cidr {
    type Err = SecurityError;
    fn from_str(s: &str) -> Result<Cidr, SecurityError> {
        let bad = |why: &str| SecurityError::Invalid(format!("{s:?} is not an address block like 10.0.0.0/8 or ::1/128: {why}"));
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr = canonical(addr.parse::<IpAddr>().map_err(|_| bad("bad address"))?);
        let width = bits(addr).1;
        let prefix = match prefix {
            None => width,
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().map_err(|_| bad("bad prefix length"))?
            }
            Some(_) => return Err(bad("bad prefix length")),
        };
        if prefix > width {
            return Err(bad(&format!("the prefix length is over {width}")));
        }
        let (a, _) = bits(addr);
        let shift = u32::from(width - prefix);
        if shift < 128 && (a >> shift) << shift != a {
            return Err(bad("address bits are set past the prefix length"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A list of blocks; empty means everyone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowList(pub Vec<Cidr>);

impl AllowList {
    /// Whether `ip` may connect.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.0.is_empty() || self.0.iter().any(|c| c.contains(ip))
    }

    /// Parses a list of blocks, naming the bad one.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<AllowList, SecurityError> {
        items.iter().map(|s| s.as_ref().parse()).collect::<Result<Vec<_>, _>>().map(AllowList)
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("any address");
        }
        let items: Vec<String> = self.0.iter().map(|c| c.to_string()).collect();
        f.write_str(&items.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_match_what_they_cover() {
        let lo: Cidr = "127.0.0.0/8".parse().unwrap();
        assert!(lo.contains(ip("127.9.9.9")));
        assert!(lo.contains(ip("::ffff:127.0.0.1")), "v4-mapped addresses match their v4 block");
        assert!(!lo.contains(ip("128.0.0.1")));
        assert!(!lo.contains(ip("::1")));
        let one: Cidr = "10.1.2.3".parse().unwrap();
        assert!(one.contains(ip("10.1.2.3")) && !one.contains(ip("10.1.2.4")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")) && !all.contains(ip("2001:db8::1")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:1::1")) && !v6.contains(ip("2001:db9::1")));
        assert!("::/0".parse::<Cidr>().unwrap().contains(ip("::1")));
        assert_eq!(lo.to_string(), "127.0.0.0/8");
    }

    #[test]
    fn malformed_blocks_are_refused() {
        for bad in ["", "10.0.0.0/33", "10.0.0.1/8", "10.0.0.0/-1", "10.0.0.0/+8", "10.0.0.0/", "::1/129", "host/8", "10.0.0.0/8/8", "10.0.0.0/0008"]
        {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
        assert!(AllowList::default().allows(ip("1.2.3.4")));
        let list = AllowList::parse(&["127.0.0.1", "10.0.0.0/8"]).unwrap();
        assert!(list.allows(ip("10.3.3.3")) && !list.allows(ip("11.0.0.1")));
        assert!(AllowList::parse(&["10.0.0.0/8", "nope"]).unwrap_err().to_string().contains("nope"));
    }
}
