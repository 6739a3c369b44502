//! The egress policy: which Ethernet frames the guest may send to passt.
//!
//! Every frame the guest puts on the virtio-net tx queue goes through [`Policy::check_egress`] before
//! it reaches passt; a frame that is dropped is counted under its [`DropReason`]. The frame is parsed
//! by hand, every read bounds-checked: nothing the guest sends can panic here.
//!
//! # Rules
//!
//! - **Ethernet**: the source MAC must be the guest's. 802.1Q/802.1ad-tagged frames and every EtherType
//!   but ARP, IPv4 and IPv6 are dropped. IP frames must go to a unicast MAC.
//! - **ARP**: only a request for the gateway's (or the DNS forwarder's) address and a reply to the
//!   gateway, with the guest's own MAC and IPv4 address as sender. passt answers.
//! - **IPv4**: the source must be the guest's address; fragments (MF or an offset), options and bad
//!   lengths are dropped (passt checks the checksums). Only TCP, UDP and ICMP echo requests pass.
//! - **IPv6**: the source must be the guest's address; a fragment header or any other extension header
//!   (hop-by-hop, routing, destination options, AH, ESP, ...) drops the frame. Only TCP, UDP, ICMPv6
//!   echo requests and the neighbour discovery the guest needs towards the gateway pass: a router
//!   solicitation to all-routers, a neighbour solicitation for the gateway (or duplicate address
//!   detection of its own addresses), a neighbour advertisement of its own addresses, with its own MAC
//!   in any link-layer address option, from its link-local address. A Linux guest also sends MLD
//!   reports (behind a hop-by-hop header): they are dropped as extension headers.
//! - **Destinations**, default policy (plain `--net`): DNS (TCP or UDP port 53) to the configured
//!   forwarder address, and TCP, UDP and ICMP echo to public addresses. Never the gateway (passt maps it
//!   to the host's loopback unless told otherwise), the guest's own address, loopback, link-local
//!   (169.254/16, with 169.254.169.254 counted as the metadata service, fe80::/10), RFC 1918, CGNAT
//!   100.64/10, unique-local fc00::/7, multicast, broadcast, 0/8 and the other reserved ranges.
//! - **Destinations with an allowlist** (`--net-allow`): DNS to the forwarder as above, and only what an
//!   entry covers (address or CIDR, and port if it names one; an entry with a port does not admit ICMP
//!   echo). Naming a private or link-local destination explicitly is the only way to reach one.
//! - A TCP segment dropped for its destination ([`DropReason::is_destination`]) is answered by the
//!   device with a reset from that destination (`super::reply`), so a denied connection fails at once.
//!
//! # Host names
//!
//! An allowlist entry may be a host name. Its addresses are not resolved once at start (they change,
//! and a CDN answers differently each time); instead the policy watches the DNS answers that come back
//! to the guest from passt's forwarder ([`Policy::observe_ingress`], on the rx path, which only passt
//! writes to) and admits the A and AAAA addresses returned for an allowed name, through any CNAME chain
//! that starts at it, so the addresses the guest connects to are exactly the ones it was told. Rules:
//!
//! - Only UDP responses from the forwarder's address and port 53 to the guest count, with exactly one
//!   question, no error code, and the question being an allowed name (exact match, case-insensitive;
//!   `example.com` does not cover `www.example.com`). A record whose owner is not the question or a
//!   name the CNAME chain reached is ignored: a resolver cannot smuggle in other names' addresses.
//! - An address is admitted with the entry's port restriction, for the rest of the run: the TTL is
//!   ignored, because the guest's resolver may cache longer than it should, and a build is short.
//! - Only public addresses are admitted this way. An answer pointing at a private, link-local or
//!   otherwise special address (DNS rebinding towards the metadata service or the internal network) is
//!   ignored and counted; the operator must name such a destination as an address or CIDR.
//! - At most [`MAX_LEARNED`] addresses are learned; past that, answers admit nothing new (counted).
//! - DNS over TCP is forwarded but not watched (a response may span segments): names resolved only over
//!   TCP are not admitted. The guest's resolver uses UDP unless an answer is truncated.
//!
//! What the policy does not protect against: data leaving in DNS queries through the forwarder (any
//! name may be queried), and traffic to an allowed destination itself.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::allow::{self, AllowEntry, AllowError, Target};
use super::dns::{self, RecordData};

/// Length of an Ethernet II header.
pub const ETH_HEADER_LEN: usize = 14;
/// Addresses learned from DNS answers, at most (a build talks to a few dozen).
pub const MAX_LEARNED: usize = 1024;
/// Names reached through a CNAME chain, at most, per response.
const MAX_CHAIN: usize = 16;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: [u16; 3] = [0x8100, 0x88a8, 0x9100];

const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;
const PROTO_IPV6_FRAGMENT: u8 = 44;
/// IPv6 extension headers (RFC 8200, 4; RFC 7045) and "no next header".
const IPV6_EXTENSION_HEADERS: [u8; 10] = [0, 43, 50, 51, 59, 60, 135, 139, 140, 253];
const IPV6_EXPERIMENTAL_254: u8 = 254;

const DNS_PORT: u16 = 53;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ND_ROUTER_SOLICIT: u8 = 133;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
const ND_OPT_SOURCE_LL: u8 = 1;
const ND_OPT_TARGET_LL: u8 = 2;

const BROADCAST_MAC: [u8; 6] = [0xff; 6];
const METADATA_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// Why a frame was dropped. Each is counted on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum DropReason {
    #[error("malformed or truncated frame")]
    Malformed,
    #[error("VLAN-tagged frame")]
    VlanTagged,
    #[error("EtherType other than ARP, IPv4 and IPv6")]
    EtherType,
    #[error("source MAC address is not the guest's")]
    SpoofedMac,
    #[error("source address is not the guest's")]
    SpoofedSource,
    #[error("ARP other than a request for the gateway")]
    Arp,
    #[error("IP fragment")]
    Fragment,
    #[error("IPv4 options")]
    Ipv4Options,
    #[error("IPv6 extension header")]
    ExtensionHeader,
    #[error("protocol other than TCP, UDP and ICMP echo")]
    Protocol,
    #[error("ICMP other than echo requests and neighbour discovery with the gateway")]
    Icmp,
    #[error("to the gateway (the host)")]
    Gateway,
    #[error("to the guest's own address")]
    OwnAddress,
    #[error("to a loopback address")]
    Loopback,
    #[error("to the cloud metadata service")]
    Metadata,
    #[error("to a link-local address")]
    LinkLocal,
    #[error("to a private (RFC 1918) address")]
    Private,
    #[error("to a CGNAT (100.64/10) address")]
    SharedAddress,
    #[error("to a unique-local (fc00::/7) address")]
    UniqueLocal,
    #[error("to a multicast address")]
    Multicast,
    #[error("to a broadcast address")]
    Broadcast,
    #[error("to 0.0.0.0/8 or ::")]
    Unspecified,
    #[error("to a reserved address")]
    Reserved,
    #[error("to a destination not on the allowlist")]
    NotAllowed,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 24] = [
        DropReason::Malformed,
        DropReason::VlanTagged,
        DropReason::EtherType,
        DropReason::SpoofedMac,
        DropReason::SpoofedSource,
        DropReason::Arp,
        DropReason::Fragment,
        DropReason::Ipv4Options,
        DropReason::ExtensionHeader,
        DropReason::Protocol,
        DropReason::Icmp,
        DropReason::Gateway,
        DropReason::OwnAddress,
        DropReason::Loopback,
        DropReason::Metadata,
        DropReason::LinkLocal,
        DropReason::Private,
        DropReason::SharedAddress,
        DropReason::UniqueLocal,
        DropReason::Multicast,
        DropReason::Broadcast,
        DropReason::Unspecified,
        DropReason::Reserved,
        DropReason::NotAllowed,
    ];

    /// The counter's name, for `--result` (stable: scripts read it).
    pub fn counter_name(self) -> &'static str {
        match self {
            DropReason::Malformed => "dropped_malformed",
            DropReason::VlanTagged => "dropped_vlan",
            DropReason::EtherType => "dropped_ethertype",
            DropReason::SpoofedMac => "dropped_spoofed_mac",
            DropReason::SpoofedSource => "dropped_spoofed_source",
            DropReason::Arp => "dropped_arp",
            DropReason::Fragment => "dropped_fragment",
            DropReason::Ipv4Options => "dropped_ipv4_options",
            DropReason::ExtensionHeader => "dropped_ipv6_extension_header",
            DropReason::Protocol => "dropped_protocol",
            DropReason::Icmp => "dropped_icmp",
            DropReason::Gateway => "dropped_to_gateway",
            DropReason::OwnAddress => "dropped_to_own_address",
            DropReason::Loopback => "dropped_to_loopback",
            DropReason::Metadata => "dropped_to_metadata",
            DropReason::LinkLocal => "dropped_to_link_local",
            DropReason::Private => "dropped_to_private",
            DropReason::SharedAddress => "dropped_to_cgnat",
            DropReason::UniqueLocal => "dropped_to_unique_local",
            DropReason::Multicast => "dropped_to_multicast",
            DropReason::Broadcast => "dropped_to_broadcast",
            DropReason::Unspecified => "dropped_to_unspecified",
            DropReason::Reserved => "dropped_to_reserved",
            DropReason::NotAllowed => "dropped_not_allowed",
        }
    }

    /// Whether the frame was refused for where it goes (rather than for what it is): such a TCP
    /// segment is answered with a reset, so that the guest gives up at once. Not multicast and
    /// broadcast, which are also refused at the Ethernet layer, before the source is checked.
    pub fn is_destination(self) -> bool {
        matches!(
            self,
            DropReason::Gateway
                | DropReason::OwnAddress
                | DropReason::Loopback
                | DropReason::Metadata
                | DropReason::LinkLocal
                | DropReason::Private
                | DropReason::SharedAddress
                | DropReason::UniqueLocal
                | DropReason::Unspecified
                | DropReason::Reserved
                | DropReason::NotAllowed
        )
    }

    fn index(self) -> usize {
        // ALL lists every variant once, so the search always finds it.
        DropReason::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// The addresses of the guest's network, as vmm configures passt and the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetAddresses {
    pub guest_mac: [u8; 6],
    pub guest_ipv4: Ipv4Addr,
    pub gateway_ipv4: Ipv4Addr,
    /// passt's DNS forwarder (`--dns-forward`), if DNS is offered.
    pub dns_ipv4: Option<Ipv4Addr>,
    /// None: the guest has no IPv6 address; only neighbour discovery may pass.
    pub guest_ipv6: Option<Ipv6Addr>,
    pub gateway_ipv6: Option<Ipv6Addr>,
    pub dns_ipv6: Option<Ipv6Addr>,
}

/// What the policy has counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyCounters {
    pub allowed_frames: u64,
    /// Dropped frames per reason, in the order of [`DropReason::ALL`].
    pub dropped: [u64; DropReason::ALL.len()],
    /// Addresses admitted from DNS answers for allowed names.
    pub dns_learned: u64,
    /// Answers for allowed names that pointed at a non-public address, and were ignored.
    pub dns_refused_answers: u64,
    /// Addresses not learned because [`MAX_LEARNED`] were already.
    pub dns_learned_over_cap: u64,
}

impl PolicyCounters {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped.get(reason.index()).copied().unwrap_or(0)
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }
}

/// The transport part of a frame the rules look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp(u16),
    Udp(u16),
    Echo,
}

impl Transport {
    fn port(self) -> Option<u16> {
        match self {
            Transport::Tcp(p) | Transport::Udp(p) => Some(p),
            Transport::Echo => None,
        }
    }
}

/// The egress policy of one VM. See the module documentation.
#[derive(Debug, Clone)]
pub struct Policy {
    addrs: NetAddresses,
    /// The guest's EUI-64 link-local address (the kernel's default), the source of its neighbour
    /// discovery.
    guest_link_local: Ipv6Addr,
    /// None: the default policy. Some: only what the entries (and the addresses learned for their host
    /// names) cover.
    allow: Option<Vec<AllowEntry>>,
    /// Addresses learned from DNS answers, with the port of the entry that named them (a set: it is
    /// looked up for every frame).
    learned: HashSet<(IpAddr, Option<u16>)>,
    counters: PolicyCounters,
}

impl Policy {
    /// The policy for a guest with `addrs`: the default policy if `allow` is empty, else an allowlist.
    pub fn new(addrs: NetAddresses, allow: Vec<AllowEntry>) -> Self {
        Policy {
            guest_link_local: eui64_link_local(addrs.guest_mac),
            addrs,
            allow: (!allow.is_empty()).then_some(allow),
            learned: HashSet::new(),
            counters: PolicyCounters::default(),
        }
    }

    /// Parses one `--net-allow` value (see [`AllowEntry::parse`]).
    pub fn parse_allow(value: &str) -> Result<AllowEntry, AllowError> {
        AllowEntry::parse(value)
    }

    pub fn counters(&self) -> &PolicyCounters {
        &self.counters
    }

    /// Addresses learned from DNS answers so far, sorted.
    pub fn learned(&self) -> Vec<(IpAddr, Option<u16>)> {
        let mut learned: Vec<_> = self.learned.iter().copied().collect();
        learned.sort_unstable();
        learned
    }

    /// Whether the guest may send `frame` (an Ethernet frame, without the virtio-net header). Counts
    /// the verdict.
    pub fn check_egress(&mut self, frame: &[u8]) -> Result<(), DropReason> {
        let verdict = self.classify(frame);
        match verdict {
            Ok(()) => self.counters.allowed_frames += 1,
            Err(reason) => {
                if let Some(n) = self.counters.dropped.get_mut(reason.index()) {
                    *n += 1;
                }
            }
        }
        verdict
    }

    /// The verdict on one frame, without counting it.
    pub fn classify(&self, frame: &[u8]) -> Result<(), DropReason> {
        let eth = Ethernet::parse(frame)?;
        if ETHERTYPE_VLAN.contains(&eth.ethertype) {
            return Err(DropReason::VlanTagged);
        }
        if eth.src != self.addrs.guest_mac {
            return Err(DropReason::SpoofedMac);
        }
        match eth.ethertype {
            ETHERTYPE_ARP => self.check_arp(eth.payload),
            ETHERTYPE_IPV4 => {
                unicast_mac(eth.dst)?;
                self.check_ipv4(eth.payload)
            }
            ETHERTYPE_IPV6 => self.check_ipv6(eth.dst, eth.payload),
            _ => Err(DropReason::EtherType),
        }
    }

    fn check_arp(&self, arp: &[u8]) -> Result<(), DropReason> {
        let header = arp.get(..28).ok_or(DropReason::Malformed)?;
        // Ethernet hardware, IPv4 protocol, 6- and 4-byte addresses
        if header[..6] != [0, 1, 8, 0, 6, 4] {
            return Err(DropReason::Arp);
        }
        let op = be16(header, 6)?;
        let sender_mac = &header[8..14];
        let sender_ip = ipv4_at(header, 14)?;
        let target_ip = ipv4_at(header, 24)?;
        if sender_mac != self.addrs.guest_mac || sender_ip != self.addrs.guest_ipv4 {
            return Err(DropReason::SpoofedSource);
        }
        let gateway = self.addrs.gateway_ipv4;
        match op {
            1 if target_ip == gateway || Some(target_ip) == self.addrs.dns_ipv4 => Ok(()),
            2 if target_ip == gateway => Ok(()),
            _ => Err(DropReason::Arp),
        }
    }

    fn check_ipv4(&self, packet: &[u8]) -> Result<(), DropReason> {
        let first = *packet.first().ok_or(DropReason::Malformed)?;
        let header_len = usize::from(first & 0xf) * 4;
        if first >> 4 != 4 || header_len < 20 || packet.len() < 20 {
            return Err(DropReason::Malformed);
        }
        let total_len = usize::from(be16(packet, 2)?);
        if total_len < header_len || total_len > packet.len() {
            return Err(DropReason::Malformed);
        }
        let fragment = be16(packet, 6)?;
        // MF, or a fragment offset: a later fragment carries no ports to check
        if fragment & 0x3fff != 0 {
            return Err(DropReason::Fragment);
        }
        if header_len > 20 {
            return Err(DropReason::Ipv4Options);
        }
        let src = ipv4_at(packet, 12)?;
        let dst = ipv4_at(packet, 16)?;
        if src != self.addrs.guest_ipv4 {
            return Err(DropReason::SpoofedSource);
        }
        let payload = packet
            .get(header_len..total_len)
            .ok_or(DropReason::Malformed)?;
        let transport = match packet[9] {
            PROTO_TCP => Transport::Tcp(tcp_port(payload)?),
            PROTO_UDP => Transport::Udp(udp_port(payload)?),
            PROTO_ICMP => {
                let icmp = payload.get(..8).ok_or(DropReason::Malformed)?;
                if icmp[0] != ICMP_ECHO_REQUEST || icmp[1] != 0 {
                    return Err(DropReason::Icmp);
                }
                Transport::Echo
            }
            _ => return Err(DropReason::Protocol),
        };
        self.check_destination(IpAddr::V4(dst), transport)
    }

    fn check_ipv6(&self, dst_mac: &[u8], packet: &[u8]) -> Result<(), DropReason> {
        let header = packet.get(..40).ok_or(DropReason::Malformed)?;
        if header[0] >> 4 != 6 {
            return Err(DropReason::Malformed);
        }
        let payload_len = usize::from(be16(header, 4)?);
        let payload = packet
            .get(40..40 + payload_len)
            .ok_or(DropReason::Malformed)?;
        let next = header[6];
        let src = ipv6_at(header, 8)?;
        let dst = ipv6_at(header, 24)?;
        match next {
            PROTO_IPV6_FRAGMENT => return Err(DropReason::Fragment),
            n if IPV6_EXTENSION_HEADERS.contains(&n) || n == IPV6_EXPERIMENTAL_254 => {
                return Err(DropReason::ExtensionHeader)
            }
            _ => {}
        }
        if next == PROTO_ICMPV6 {
            let kind = *payload.first().ok_or(DropReason::Malformed)?;
            if matches!(
                kind,
                ND_ROUTER_SOLICIT | ND_NEIGHBOR_SOLICIT | ND_NEIGHBOR_ADVERT
            ) {
                return self.check_neighbour_discovery(src, dst, payload);
            }
        }
        unicast_mac(dst_mac)?;
        if Some(src) != self.addrs.guest_ipv6 {
            return Err(DropReason::SpoofedSource);
        }
        let transport = match next {
            PROTO_TCP => Transport::Tcp(tcp_port(payload)?),
            PROTO_UDP => Transport::Udp(udp_port(payload)?),
            PROTO_ICMPV6 => {
                let icmp = payload.get(..8).ok_or(DropReason::Malformed)?;
                if icmp[0] != ICMPV6_ECHO_REQUEST || icmp[1] != 0 {
                    return Err(DropReason::Icmp);
                }
                Transport::Echo
            }
            _ => return Err(DropReason::Protocol),
        };
        self.check_destination(IpAddr::V6(dst), transport)
    }

    /// Router and neighbour solicitations and neighbour advertisements: what the guest needs to find
    /// the gateway's MAC and keep its own addresses, and nothing towards anyone else.
    fn check_neighbour_discovery(
        &self,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        icmp: &[u8],
    ) -> Result<(), DropReason> {
        let kind = *icmp.first().ok_or(DropReason::Malformed)?;
        if icmp.get(1) != Some(&0) {
            return Err(DropReason::Icmp);
        }
        let own = |a: Ipv6Addr| a == self.guest_link_local || Some(a) == self.addrs.guest_ipv6;
        let dad = src.is_unspecified();
        // The unspecified source is for duplicate address detection only.
        let dad_probe = dad && kind == ND_NEIGHBOR_SOLICIT;
        if !(own(src) || dad_probe) {
            return Err(DropReason::SpoofedSource);
        }
        // RS: 4 reserved bytes; NS and NA: 4 bytes, then the target address
        let options_at = if kind == ND_ROUTER_SOLICIT { 8 } else { 24 };
        let options = icmp.get(options_at..).ok_or(DropReason::Malformed)?;
        self.check_nd_options(options)?;
        let allowed = match kind {
            ND_ROUTER_SOLICIT => dst == ALL_ROUTERS,
            ND_NEIGHBOR_SOLICIT => {
                let target = ipv6_at(icmp, 8)?;
                if dad {
                    own(target) && dst == solicited_node(target)
                } else {
                    Some(target) == self.addrs.gateway_ipv6
                        && (dst == target || dst == solicited_node(target))
                }
            }
            ND_NEIGHBOR_ADVERT => {
                let target = ipv6_at(icmp, 8)?;
                // The answer to passt's solicitation (from its link-local address), or unsolicited.
                own(target) && (is_link_local_v6(dst) || dst == ALL_NODES)
            }
            _ => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(DropReason::Icmp)
        }
    }

    /// A link-layer address option must carry the guest's own MAC: passt learns from it.
    fn check_nd_options(&self, mut options: &[u8]) -> Result<(), DropReason> {
        // Each option is at least 8 bytes, so this ends after at most len/8 rounds.
        while !options.is_empty() {
            let kind = options[0];
            let len = usize::from(*options.get(1).ok_or(DropReason::Malformed)?) * 8;
            if len == 0 {
                return Err(DropReason::Malformed);
            }
            let option = options.get(..len).ok_or(DropReason::Malformed)?;
            if (kind == ND_OPT_SOURCE_LL || kind == ND_OPT_TARGET_LL)
                && option.get(2..8) != Some(&self.addrs.guest_mac[..])
            {
                return Err(DropReason::SpoofedMac);
            }
            options = options.get(len..).unwrap_or(&[]);
        }
        Ok(())
    }

    fn check_destination(&self, dst: IpAddr, transport: Transport) -> Result<(), DropReason> {
        let is_dns_forwarder = match dst {
            IpAddr::V4(a) => Some(a) == self.addrs.dns_ipv4,
            IpAddr::V6(a) => Some(a) == self.addrs.dns_ipv6,
        };
        if is_dns_forwarder
            && matches!(
                transport,
                Transport::Tcp(DNS_PORT) | Transport::Udp(DNS_PORT)
            )
        {
            return Ok(());
        }
        let own = match dst {
            IpAddr::V4(a) => a == self.addrs.guest_ipv4,
            IpAddr::V6(a) => Some(a) == self.addrs.guest_ipv6 || a == self.guest_link_local,
        };
        if own {
            return Err(DropReason::OwnAddress);
        }
        let gateway = match dst {
            IpAddr::V4(a) => a == self.addrs.gateway_ipv4,
            IpAddr::V6(a) => Some(a) == self.addrs.gateway_ipv6,
        };
        let special = if gateway {
            Some(DropReason::Gateway)
        } else {
            special_address(dst)
        };
        let Some(entries) = &self.allow else {
            return special.map_or(Ok(()), Err);
        };
        let port = transport.port();
        // A learned address admits every port if its entry named none, else that port only.
        let listed = entries.iter().any(|e| e.covers(dst, port))
            || self.learned.contains(&(dst, None))
            || (port.is_some() && self.learned.contains(&(dst, port)));
        if listed {
            Ok(())
        } else {
            Err(special.unwrap_or(DropReason::NotAllowed))
        }
    }

    /// Looks at a frame passt sends the guest: a DNS answer from the forwarder for an allowed host name
    /// admits the addresses it gives (see the module documentation). Never drops or changes anything.
    pub fn observe_ingress(&mut self, frame: &[u8]) {
        let has_names = self
            .allow
            .as_ref()
            .is_some_and(|entries| entries.iter().any(|e| matches!(e.target, Target::Host(_))));
        if !has_names {
            return;
        }
        if let Some(message) = self.dns_answer_payload(frame) {
            if let Ok(response) = dns::parse_response(message) {
                self.learn(&response);
            }
        }
    }

    /// The UDP payload of `frame` if it is a datagram from the DNS forwarder's port 53 to the guest.
    fn dns_answer_payload<'f>(&self, frame: &'f [u8]) -> Option<&'f [u8]> {
        let eth = Ethernet::parse(frame).ok()?;
        let (from_forwarder, to_guest, proto, payload) = match eth.ethertype {
            ETHERTYPE_IPV4 => {
                let p = eth.payload;
                let header_len = usize::from(*p.first()? & 0xf) * 4;
                let total_len = usize::from(be16(p, 2).ok()?);
                if be16(p, 6).ok()? & 0x3fff != 0 || header_len < 20 {
                    return None;
                }
                (
                    Some(ipv4_at(p, 12).ok()?) == self.addrs.dns_ipv4,
                    ipv4_at(p, 16).ok()? == self.addrs.guest_ipv4,
                    *p.get(9)?,
                    p.get(header_len..total_len)?,
                )
            }
            ETHERTYPE_IPV6 => {
                let p = eth.payload;
                let payload_len = usize::from(be16(p, 4).ok()?);
                (
                    Some(ipv6_at(p, 8).ok()?) == self.addrs.dns_ipv6,
                    Some(ipv6_at(p, 24).ok()?) == self.addrs.guest_ipv6,
                    *p.get(6)?,
                    p.get(40..40 + payload_len)?,
                )
            }
            _ => return None,
        };
        if !from_forwarder || !to_guest || proto != PROTO_UDP {
            return None;
        }
        let udp_len = usize::from(be16(payload, 4).ok()?);
        if be16(payload, 0).ok()? != DNS_PORT || udp_len < 8 {
            return None;
        }
        payload.get(8..udp_len)
    }

    fn learn(&mut self, response: &dns::Response) {
        let Some(question) = &response.question else {
            return;
        };
        let Some(entries) = &self.allow else {
            return;
        };
        let ports: Vec<Option<u16>> = entries
            .iter()
            .filter(|e| matches!(&e.target, Target::Host(name) if name == question))
            .map(|e| e.port)
            .collect();
        if ports.is_empty() {
            return;
        }
        // The names this answer speaks for: the question, and what its CNAME chain reaches. Records
        // come in chain order from real resolvers; a few passes catch any other order.
        let mut names: Vec<&str> = vec![question.as_str()];
        for _ in 0..MAX_CHAIN {
            let before = names.len();
            for answer in &response.answers {
                if let (Some(owner), RecordData::Cname(Some(target))) = (&answer.name, &answer.data)
                {
                    if names.contains(&owner.as_str())
                        && !names.contains(&target.as_str())
                        && names.len() < MAX_CHAIN
                    {
                        names.push(target.as_str());
                    }
                }
            }
            if names.len() == before {
                break;
            }
        }
        let mut admitted = Vec::new();
        let mut refused = 0u64;
        for answer in &response.answers {
            let Some(owner) = &answer.name else { continue };
            if !names.contains(&owner.as_str()) {
                continue;
            }
            let ip = match answer.data {
                RecordData::A(a) => IpAddr::V4(a),
                RecordData::Aaaa(a) => IpAddr::V6(a),
                RecordData::Cname(_) => continue,
            };
            if special_address(ip).is_some() || self.is_gateway_or_guest(ip) {
                refused += 1;
                continue;
            }
            admitted.push(ip);
        }
        self.counters.dns_refused_answers += refused;
        for ip in admitted {
            for &port in &ports {
                if self.learned.contains(&(ip, port)) {
                    continue;
                }
                if self.learned.len() >= MAX_LEARNED {
                    self.counters.dns_learned_over_cap += 1;
                    continue;
                }
                self.learned.insert((ip, port));
                self.counters.dns_learned += 1;
            }
        }
    }

    fn is_gateway_or_guest(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => a == self.addrs.gateway_ipv4 || a == self.addrs.guest_ipv4,
            IpAddr::V6(a) => Some(a) == self.addrs.gateway_ipv6 || Some(a) == self.addrs.guest_ipv6,
        }
    }
}

/// The Ethernet II header of a frame.
struct Ethernet<'f> {
    dst: &'f [u8],
    src: &'f [u8],
    ethertype: u16,
    payload: &'f [u8],
}

impl<'f> Ethernet<'f> {
    fn parse(frame: &'f [u8]) -> Result<Self, DropReason> {
        let (header, payload) = frame
            .split_at_checked(ETH_HEADER_LEN)
            .ok_or(DropReason::Malformed)?;
        Ok(Ethernet {
            dst: &header[..6],
            src: &header[6..12],
            ethertype: be16(header, 12)?,
            payload,
        })
    }
}

/// IP traffic goes to the gateway's MAC: a group address would reach whatever else is on the link.
fn unicast_mac(mac: &[u8]) -> Result<(), DropReason> {
    if mac == BROADCAST_MAC {
        Err(DropReason::Broadcast)
    } else if mac.first().is_some_and(|b| b & 1 != 0) {
        Err(DropReason::Multicast)
    } else {
        Ok(())
    }
}

/// Why `ip` is no public destination, or None if it is one.
pub fn special_address(ip: IpAddr) -> Option<DropReason> {
    match ip {
        IpAddr::V4(a) => special_v4(a),
        IpAddr::V6(a) => special_v6(a),
    }
}

fn special_v4(a: Ipv4Addr) -> Option<DropReason> {
    let o = a.octets();
    let in_net = |net: [u8; 4], prefix: u8| {
        allow::net_contains(IpAddr::V4(Ipv4Addr::from(net)), prefix, IpAddr::V4(a))
    };
    Some(match o {
        _ if a == Ipv4Addr::BROADCAST => DropReason::Broadcast,
        _ if a == METADATA_IPV4 => DropReason::Metadata,
        [0, ..] => DropReason::Unspecified,
        [127, ..] => DropReason::Loopback,
        [169, 254, ..] => DropReason::LinkLocal,
        [10, ..] => DropReason::Private,
        _ if in_net([172, 16, 0, 0], 12) || in_net([192, 168, 0, 0], 16) => DropReason::Private,
        _ if in_net([100, 64, 0, 0], 10) => DropReason::SharedAddress,
        _ if in_net([224, 0, 0, 0], 4) => DropReason::Multicast,
        // 192.0.0/24 (protocol assignments), the three TEST-NETs, 198.18/15 (benchmarking), 240/4
        _ if in_net([192, 0, 0, 0], 24)
            || in_net([192, 0, 2, 0], 24)
            || in_net([198, 51, 100, 0], 24)
            || in_net([203, 0, 113, 0], 24)
            || in_net([198, 18, 0, 0], 15)
            || in_net([240, 0, 0, 0], 4) =>
        {
            DropReason::Reserved
        }
        _ => return None,
    })
}

fn special_v6(a: Ipv6Addr) -> Option<DropReason> {
    let s = a.segments();
    let in_net =
        |net: Ipv6Addr, prefix: u8| allow::net_contains(IpAddr::V6(net), prefix, IpAddr::V6(a));
    Some(if a.is_unspecified() {
        DropReason::Unspecified
    } else if a.is_loopback() {
        DropReason::Loopback
    } else if s[0] & 0xff00 == 0xff00 {
        DropReason::Multicast
    } else if is_link_local_v6(a) {
        DropReason::LinkLocal
    } else if s[0] & 0xfe00 == 0xfc00 {
        DropReason::UniqueLocal
    } else if let Some(v4) = a.to_ipv4_mapped() {
        // ::ffff:a.b.c.d reaches a.b.c.d on a dual-stack socket: judged as that address
        return special_v4(v4);
    } else if s[0] & 0xe000 != 0x2000
        || in_net(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32)
        || in_net(Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23)
        || in_net(Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16)
        || in_net(Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20)
    {
        // Outside global unicast 2000::/3, documentation, protocol assignments (Teredo among them),
        // 6to4 (which embeds an IPv4 address of any kind): no build needs these.
        DropReason::Reserved
    } else {
        return None;
    })
}

fn is_link_local_v6(a: Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

/// ff02::1:ffXX:XXXX, where a neighbour solicitation for `target` is sent.
fn solicited_node(target: Ipv6Addr) -> Ipv6Addr {
    let s = target.segments();
    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | (s[6] & 0xff), s[7])
}

/// The link-local address the kernel derives from a MAC (modified EUI-64, RFC 4291 appendix A).
pub fn eui64_link_local(mac: [u8; 6]) -> Ipv6Addr {
    let m = mac;
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m[0] ^ 2,
        m[1],
        m[2],
        0xff,
        0xfe,
        m[3],
        m[4],
        m[5],
    ])
}

fn be16(bytes: &[u8], at: usize) -> Result<u16, DropReason> {
    let b = bytes.get(at..at + 2).ok_or(DropReason::Malformed)?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

fn ipv4_at(bytes: &[u8], at: usize) -> Result<Ipv4Addr, DropReason> {
    let b = bytes.get(at..at + 4).ok_or(DropReason::Malformed)?;
    <[u8; 4]>::try_from(b)
        .map(Ipv4Addr::from)
        .map_err(|_| DropReason::Malformed)
}

fn ipv6_at(bytes: &[u8], at: usize) -> Result<Ipv6Addr, DropReason> {
    let b = bytes.get(at..at + 16).ok_or(DropReason::Malformed)?;
    <[u8; 16]>::try_from(b)
        .map(Ipv6Addr::from)
        .map_err(|_| DropReason::Malformed)
}

/// The destination port of a TCP segment with a sane header length.
fn tcp_port(segment: &[u8]) -> Result<u16, DropReason> {
    let data_offset = usize::from(*segment.get(12).ok_or(DropReason::Malformed)? >> 4) * 4;
    if data_offset < 20 || data_offset > segment.len() {
        return Err(DropReason::Malformed);
    }
    be16(segment, 2)
}

/// The destination port of a UDP datagram whose length field fits what was sent.
fn udp_port(datagram: &[u8]) -> Result<u16, DropReason> {
    let len = usize::from(be16(datagram, 4)?);
    if len < 8 || len > datagram.len() {
        return Err(DropReason::Malformed);
    }
    be16(datagram, 2)
}
