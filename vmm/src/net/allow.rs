//! `--net-allow DEST`: one allowlist entry, as the operator writes it.
//!
//! DEST is a host name, an IPv4 or IPv6 address, or a CIDR, each with an optional `:PORT`; an IPv6
//! address or CIDR with a port is written `[ADDR]:PORT` (a bare IPv6 address has colons of its own).
//! Every mistake is refused with one line that says what was wrong, before anything starts.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why a `--net-allow` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllowError {
    #[error("--net-allow: empty destination")]
    Empty,
    #[error("--net-allow {0:?}: missing ']' after the IPv6 address")]
    MissingBracket(String),
    #[error("--net-allow {0:?}: only ':PORT' may follow ']'")]
    AfterBracket(String),
    #[error("--net-allow {0:?}: brackets are for IPv6 addresses only")]
    BracketedNotIpv6(String),
    #[error("--net-allow {0:?}: bad port (1-65535)")]
    BadPort(String),
    #[error("--net-allow {0:?}: not an IPv6 address (an IPv6 address with a port is written [ADDR]:PORT)")]
    BadIpv6(String),
    #[error("--net-allow {0:?}: not an IPv4 address")]
    BadIpv4(String),
    #[error("--net-allow {0:?}: bad prefix length (0-32 for IPv4, 0-128 for IPv6)")]
    BadPrefix(String),
    #[error("--net-allow {0:?}: the address has bits set past the prefix (did you mean {1}?)")]
    HostBits(String, String),
    #[error("--net-allow {0:?}: not a host name (letters, digits, '-' and '_' in dot-separated labels of 1-63, at most 253 in all; no wildcards)")]
    BadHostName(String),
}

/// What an entry names: a network (an address is a network with a full-length prefix), or a host name
/// whose addresses the policy learns from the DNS answers the guest gets (see the policy's design).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Net {
        addr: IpAddr,
        prefix: u8,
    },
    /// Lower case, without a trailing dot.
    Host(String),
}

/// One `--net-allow` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowEntry {
    pub target: Target,
    /// None: every port (and ICMP echo).
    pub port: Option<u16>,
}

impl AllowEntry {
    /// Parses the CLI syntax. See the module documentation.
    pub fn parse(value: &str) -> Result<Self, AllowError> {
        let s = value.trim();
        if s.is_empty() {
            return Err(AllowError::Empty);
        }
        let own = || value.to_string();
        if let Some(rest) = s.strip_prefix('[') {
            let Some((inside, after)) = rest.split_once(']') else {
                return Err(AllowError::MissingBracket(own()));
            };
            let port = match after {
                "" => None,
                _ => match after.strip_prefix(':') {
                    Some(p) => Some(parse_port(p, value)?),
                    None => return Err(AllowError::AfterBracket(own())),
                },
            };
            if inside
                .split('/')
                .next()
                .unwrap_or("")
                .parse::<Ipv6Addr>()
                .is_err()
            {
                return Err(AllowError::BracketedNotIpv6(own()));
            }
            let target = parse_net(inside, value)?;
            return Ok(AllowEntry { target, port });
        }
        if s.matches(':').count() >= 2 {
            // A bare IPv6 address or CIDR: its colons are its own, so there is no port.
            if s.split('/')
                .next()
                .unwrap_or("")
                .parse::<Ipv6Addr>()
                .is_err()
            {
                return Err(AllowError::BadIpv6(own()));
            }
            return Ok(AllowEntry {
                target: parse_net(s, value)?,
                port: None,
            });
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((host, port)) => (host, Some(parse_port(port, value)?)),
            None => (s, None),
        };
        // A slash, or nothing but digits and dots, means an IPv4 address or CIDR, never a name.
        if host.contains('/')
            || (!host.is_empty() && host.chars().all(|c| c.is_ascii_digit() || c == '.'))
        {
            return Ok(AllowEntry {
                target: parse_net(host, value)?,
                port,
            });
        }
        Ok(AllowEntry {
            target: Target::Host(parse_host_name(host, value)?),
            port,
        })
    }

    /// Whether this entry admits `ip` (and `port`, None for ICMP echo). Host entries admit nothing by
    /// themselves: the policy admits the addresses it learned for them.
    pub fn covers(&self, ip: IpAddr, port: Option<u16>) -> bool {
        let Target::Net { addr, prefix } = &self.target else {
            return false;
        };
        port_matches(self.port, port) && net_contains(*addr, *prefix, ip)
    }
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = match &self.target {
            Target::Host(name) => name.clone(),
            Target::Net { addr, prefix } => {
                let full = if addr.is_ipv4() { 32 } else { 128 };
                if *prefix == full {
                    addr.to_string()
                } else {
                    format!("{addr}/{prefix}")
                }
            }
        };
        match (self.port, &self.target) {
            (None, _) => write!(f, "{target}"),
            (Some(p), Target::Net { addr, .. }) if addr.is_ipv6() => write!(f, "[{target}]:{p}"),
            (Some(p), _) => write!(f, "{target}:{p}"),
        }
    }
}

impl std::str::FromStr for AllowEntry {
    type Err = AllowError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AllowEntry::parse(s)
    }
}

/// Whether an entry's port restriction admits `port` (None: ICMP echo, which has no port: only an
/// entry without a port admits it).
fn port_matches(entry: Option<u16>, port: Option<u16>) -> bool {
    match entry {
        None => true,
        Some(p) => port == Some(p),
    }
}

/// Whether `ip` lies in `addr/prefix` (never across address families).
pub(crate) fn net_contains(addr: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (addr, ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let mask = mask32(prefix);
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let mask = mask128(prefix);
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix.min(128)))
        .unwrap_or(0)
}

fn parse_port(port: &str, value: &str) -> Result<u16, AllowError> {
    match port.parse::<u16>() {
        // u16::parse takes "+80": a port is digits only
        Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(AllowError::BadPort(value.to_string())),
    }
}

/// ADDR or ADDR/PREFIX, with no bits set past the prefix.
fn parse_net(s: &str, value: &str) -> Result<Target, AllowError> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = if addr.contains(':') {
        IpAddr::V6(
            addr.parse::<Ipv6Addr>()
                .map_err(|_| AllowError::BadIpv6(value.to_string()))?,
        )
    } else {
        IpAddr::V4(
            addr.parse::<Ipv4Addr>()
                .map_err(|_| AllowError::BadIpv4(value.to_string()))?,
        )
    };
    let full: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => full,
        Some(p) => match p.parse::<u8>() {
            // u8::parse takes "+8": a prefix is digits only
            Ok(n) if n <= full && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(AllowError::BadPrefix(value.to_string())),
        },
    };
    let masked = match addr {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(prefix))),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(prefix))),
    };
    if masked != addr {
        return Err(AllowError::HostBits(
            value.to_string(),
            format!("{masked}/{prefix}"),
        ));
    }
    Ok(Target::Net { addr, prefix })
}

/// A DNS host name: dot-separated labels of letters, digits, '-' (not at a label's ends) and '_',
/// 1-63 bytes each, at most 253 in all; one trailing dot allowed; returned in lower case.
fn parse_host_name(host: &str, value: &str) -> Result<String, AllowError> {
    let bad = || AllowError::BadHostName(value.to_string());
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(bad());
        }
    }
    // A last label of digits only is an IPv4 address gone wrong (1.2.3.999), not a name.
    if name
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad());
    }
    Ok(name.to_ascii_lowercase())
}
