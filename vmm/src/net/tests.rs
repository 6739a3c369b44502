//! The egress policy on crafted frames: every rule, every drop reason, truncation at every length and
//! a few thousand random frames.

// test data is small
#![allow(clippy::cast_possible_truncation)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::dns::tests::{name, response, TO_QUESTION};
use super::policy::eui64_link_local;
use super::*;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GW_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];
const OTHER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xde, 0xad, 0x01];
const BCAST: [u8; 6] = [0xff; 6];
const GUEST4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const GW4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const DNS4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
const GUEST6: Ipv6Addr = Ipv6Addr::new(0x2a01, 0x4f8, 0, 0, 0, 0, 0, 0x15);
const GW6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
const DNS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3);
const PUBLIC4: Ipv4Addr = Ipv4Addr::new(93, 184, 216, 34);
const PUBLIC6: Ipv6Addr = Ipv6Addr::new(0x2606, 0x2800, 0x220, 1, 0, 0, 0, 0x1946);

fn addrs() -> NetAddresses {
    NetAddresses {
        guest_mac: GUEST_MAC,
        guest_ipv4: GUEST4,
        gateway_ipv4: GW4,
        dns_ipv4: Some(DNS4),
        guest_ipv6: Some(GUEST6),
        gateway_ipv6: Some(GW6),
        dns_ipv6: Some(DNS6),
    }
}

fn default_policy() -> Policy {
    Policy::new(addrs(), Vec::new())
}

fn allow_policy(entries: &[&str]) -> Policy {
    let entries = entries
        .iter()
        .map(|e| Policy::parse_allow(e).unwrap())
        .collect();
    Policy::new(addrs(), entries)
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

fn tcp(dport: u16) -> Vec<u8> {
    let mut t = vec![0xc3, 0x50];
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

fn udp(dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = vec![0xc3, 0x51];
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    u
}

const ECHO4: [u8; 8] = [8, 0, 0, 0, 0, 1, 0, 1];
const ECHO6: [u8; 8] = [128, 0, 0, 0, 0, 1, 0, 1];

fn v4(dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    eth(
        GW_MAC,
        GUEST_MAC,
        0x0800,
        &ipv4(GUEST4, dst, proto, payload),
    )
}

fn v6(dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    eth(GW_MAC, GUEST_MAC, 0x86dd, &ipv6(GUEST6, dst, next, payload))
}

fn tcp4(dst: Ipv4Addr, port: u16) -> Vec<u8> {
    v4(dst, 6, &tcp(port))
}

fn tcp6(dst: Ipv6Addr, port: u16) -> Vec<u8> {
    v6(dst, 6, &tcp(port))
}

fn arp(op: u16, sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sender_mac);
    a.extend_from_slice(&sender.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    eth(BCAST, GUEST_MAC, 0x0806, &a)
}

/// An ICMPv6 neighbour discovery message (no checksum: passt checks it).
fn nd(kind: u8, src: Ipv6Addr, dst: Ipv6Addr, target: Option<Ipv6Addr>, options: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, 0, 0, 0, 0, 0, 0, 0];
    if let Some(t) = target {
        m.extend_from_slice(&t.octets());
    }
    m.extend_from_slice(options);
    let mac = if dst.segments()[0] == 0xff02 {
        [0x33, 0x33, 0xff, 0, 0, 1]
    } else {
        GW_MAC
    };
    eth(mac, GUEST_MAC, 0x86dd, &ipv6(src, dst, 58, &m))
}

fn sll_option(mac: [u8; 6]) -> Vec<u8> {
    let mut o = vec![1, 1];
    o.extend_from_slice(&mac);
    o
}

fn solicited(a: Ipv6Addr) -> Ipv6Addr {
    let s = a.segments();
    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | (s[6] & 0xff), s[7])
}

fn check(policy: &Policy, frame: &[u8]) -> Result<(), DropReason> {
    policy.classify(frame)
}

#[test]
fn default_policy_allows_tcp_udp_and_echo_to_public_addresses() {
    let p = default_policy();
    assert_eq!(check(&p, &tcp4(PUBLIC4, 443)), Ok(()));
    assert_eq!(check(&p, &v4(PUBLIC4, 17, &udp(443, b"quic"))), Ok(()));
    assert_eq!(check(&p, &v4(PUBLIC4, 1, &ECHO4)), Ok(()));
    assert_eq!(check(&p, &tcp6(PUBLIC6, 80)), Ok(()));
    assert_eq!(check(&p, &v6(PUBLIC6, 17, &udp(123, b"ntp"))), Ok(()));
    assert_eq!(check(&p, &v6(PUBLIC6, 58, &ECHO6)), Ok(()));
    // just outside the private and shared ranges
    for ip in [
        [172, 32, 0, 1],
        [100, 128, 0, 1],
        [11, 0, 0, 1],
        [192, 169, 0, 1],
    ] {
        assert_eq!(check(&p, &tcp4(Ipv4Addr::from(ip), 80)), Ok(()), "{ip:?}");
    }
    // an Ethernet frame padded to the minimum size is still fine
    let mut padded = v4(PUBLIC4, 1, &ECHO4);
    padded.resize(60, 0);
    assert_eq!(check(&p, &padded), Ok(()));
}

#[test]
fn dns_goes_to_the_forwarder_only() {
    let p = default_policy();
    assert_eq!(check(&p, &v4(DNS4, 17, &udp(53, b"q"))), Ok(()));
    assert_eq!(check(&p, &tcp4(DNS4, 53)), Ok(()));
    assert_eq!(check(&p, &v6(DNS6, 17, &udp(53, b"q"))), Ok(()));
    assert_eq!(check(&p, &tcp6(DNS6, 53)), Ok(()));
    // another port of the forwarder's (private) address
    assert_eq!(
        check(&p, &v4(DNS4, 17, &udp(5353, b"q"))),
        Err(DropReason::Private)
    );
    assert_eq!(check(&p, &tcp4(DNS4, 22)), Err(DropReason::Private));
    assert_eq!(check(&p, &tcp6(DNS6, 22)), Err(DropReason::UniqueLocal));
    // DNS to a private resolver elsewhere
    assert_eq!(
        check(&p, &v4(Ipv4Addr::new(192, 168, 1, 1), 17, &udp(53, b"q"))),
        Err(DropReason::Private)
    );
    // and with an allowlist that does not name the forwarder
    let p = allow_policy(&["1.1.1.1"]);
    assert_eq!(check(&p, &v4(DNS4, 17, &udp(53, b"q"))), Ok(()));
}

#[test]
fn special_destinations_are_dropped_with_their_reason() {
    use DropReason::*;
    let p = default_policy();
    let v4_cases: &[([u8; 4], DropReason)] = &[
        ([127, 0, 0, 1], Loopback),
        ([127, 255, 0, 9], Loopback),
        ([169, 254, 169, 254], Metadata),
        ([169, 254, 1, 1], LinkLocal),
        ([10, 1, 2, 3], Private),
        ([172, 16, 0, 1], Private),
        ([172, 31, 255, 255], Private),
        ([192, 168, 1, 1], Private),
        ([100, 64, 0, 1], SharedAddress),
        ([100, 127, 255, 254], SharedAddress),
        ([224, 0, 0, 251], Multicast),
        ([239, 255, 255, 250], Multicast),
        ([255, 255, 255, 255], Broadcast),
        ([0, 0, 0, 0], Unspecified),
        ([0, 1, 2, 3], Unspecified),
        ([240, 0, 0, 1], Reserved),
        ([192, 0, 2, 1], Reserved),
        ([198, 18, 0, 1], Reserved),
        ([192, 0, 0, 170], Reserved),
        ([10, 0, 2, 2], Gateway),
        ([10, 0, 2, 15], OwnAddress),
    ];
    for &(ip, reason) in v4_cases {
        let ip = Ipv4Addr::from(ip);
        assert_eq!(check(&p, &tcp4(ip, 80)), Err(reason), "tcp {ip}");
        assert_eq!(
            check(&p, &v4(ip, 17, &udp(80, b""))),
            Err(reason),
            "udp {ip}"
        );
        assert_eq!(check(&p, &v4(ip, 1, &ECHO4)), Err(reason), "echo {ip}");
    }
    let v6_cases: &[(&str, DropReason)] = &[
        ("::1", Loopback),
        ("::", Unspecified),
        ("fe80::1", Gateway),
        ("fe80::2", LinkLocal),
        ("febf::1", LinkLocal),
        ("fc00::1", UniqueLocal),
        ("fd12:3456::1", UniqueLocal),
        ("ff02::1", Multicast),
        ("ff05::1:3", Multicast),
        ("::ffff:10.0.0.1", Private),
        ("::ffff:169.254.169.254", Metadata),
        ("::ffff:127.0.0.1", Loopback),
        ("2001:db8::1", Reserved),
        ("2001::1", Reserved),
        ("2002:a00:1::1", Reserved),
        ("4000::1", Reserved),
        ("64:ff9b::a00:1", Reserved),
        ("2a01:4f8::15", OwnAddress),
    ];
    for &(ip, reason) in v6_cases {
        let ip: Ipv6Addr = ip.parse().unwrap();
        assert_eq!(check(&p, &tcp6(ip, 80)), Err(reason), "tcp {ip}");
        assert_eq!(check(&p, &v6(ip, 58, &ECHO6)), Err(reason), "echo {ip}");
    }
    assert_eq!(
        check(&p, &tcp6("::ffff:8.8.8.8".parse().unwrap(), 80)),
        Ok(())
    );
}

#[test]
fn spoofed_sources_are_dropped() {
    let p = default_policy();
    let mut f = tcp4(PUBLIC4, 80);
    f[6..12].copy_from_slice(&OTHER_MAC);
    assert_eq!(check(&p, &f), Err(DropReason::SpoofedMac));
    let f = eth(
        GW_MAC,
        GUEST_MAC,
        0x0800,
        &ipv4(Ipv4Addr::new(10, 0, 2, 16), PUBLIC4, 6, &tcp(80)),
    );
    assert_eq!(check(&p, &f), Err(DropReason::SpoofedSource));
    let f = eth(
        GW_MAC,
        GUEST_MAC,
        0x0800,
        &ipv4(PUBLIC4, PUBLIC4, 6, &tcp(80)),
    );
    assert_eq!(check(&p, &f), Err(DropReason::SpoofedSource));
    let other6: Ipv6Addr = "2a01:4f8::16".parse().unwrap();
    let f = eth(
        GW_MAC,
        GUEST_MAC,
        0x86dd,
        &ipv6(other6, PUBLIC6, 6, &tcp(80)),
    );
    assert_eq!(check(&p, &f), Err(DropReason::SpoofedSource));
    // the link-local address is for neighbour discovery only
    let ll = eui64_link_local(GUEST_MAC);
    let f = eth(GW_MAC, GUEST_MAC, 0x86dd, &ipv6(ll, PUBLIC6, 6, &tcp(80)));
    assert_eq!(check(&p, &f), Err(DropReason::SpoofedSource));
    // a guest without IPv6 sends no IPv6 but neighbour discovery
    let mut a = addrs();
    a.guest_ipv6 = None;
    let p6 = Policy::new(a, Vec::new());
    assert_eq!(
        check(&p6, &tcp6(PUBLIC6, 80)),
        Err(DropReason::SpoofedSource)
    );
}

#[test]
fn fragments_are_dropped() {
    let p = default_policy();
    // more fragments
    let mut f = tcp4(PUBLIC4, 80);
    f[14 + 6] = 0x20;
    assert_eq!(check(&p, &f), Err(DropReason::Fragment));
    // a later fragment, offset 185 (8-byte units)
    let mut f = tcp4(PUBLIC4, 80);
    f[14 + 6] = 0;
    f[14 + 7] = 185;
    assert_eq!(check(&p, &f), Err(DropReason::Fragment));
    // DF alone is fine
    let mut f = tcp4(PUBLIC4, 80);
    f[14 + 6] = 0x40;
    assert_eq!(check(&p, &f), Ok(()));
    // IPv6 fragment header in front of a TCP header that looks allowed
    let mut frag = vec![6, 0, 0, 1, 0, 0, 0, 7];
    frag.extend(tcp(443));
    assert_eq!(
        check(&p, &v6(PUBLIC6, 44, &frag)),
        Err(DropReason::Fragment)
    );
}

#[test]
fn ipv4_options_are_dropped() {
    let p = default_policy();
    let mut packet = ipv4(GUEST4, PUBLIC4, 6, &tcp(80));
    // IHL 6 with a NOP option word inserted
    packet[0] = 0x46;
    packet.splice(20..20, [1, 1, 1, 0]);
    let total = packet.len() as u16;
    packet[2..4].copy_from_slice(&total.to_be_bytes());
    let f = eth(GW_MAC, GUEST_MAC, 0x0800, &packet);
    assert_eq!(check(&p, &f), Err(DropReason::Ipv4Options));
}

#[test]
fn ipv6_extension_headers_are_dropped() {
    let p = default_policy();
    for next in [0u8, 43, 50, 51, 59, 60, 135, 139, 140, 253, 254] {
        let mut ext = vec![6, 0, 0, 0, 0, 0, 0, 0];
        ext.extend(tcp(443));
        assert_eq!(
            check(&p, &v6(PUBLIC6, next, &ext)),
            Err(DropReason::ExtensionHeader),
            "next header {next}"
        );
    }
    // an MLD report behind a hop-by-hop header, as a Linux guest sends
    let mld = vec![58, 0, 5, 2, 0, 0, 1, 0, 143, 0, 0, 0, 0, 0, 0, 0];
    let ll = eui64_link_local(GUEST_MAC);
    let f = eth(
        [0x33, 0x33, 0, 0, 0, 0x16],
        GUEST_MAC,
        0x86dd,
        &ipv6(ll, "ff02::16".parse().unwrap(), 0, &mld),
    );
    assert_eq!(check(&p, &f), Err(DropReason::ExtensionHeader));
}

#[test]
fn other_protocols_and_icmp_types_are_dropped() {
    let p = default_policy();
    for proto in [2u8, 4, 41, 47, 50, 89, 132, 255] {
        assert_eq!(
            check(&p, &v4(PUBLIC4, proto, &[0; 32])),
            Err(DropReason::Protocol),
            "protocol {proto}"
        );
    }
    for next in [4u8, 41, 47, 132] {
        assert_eq!(
            check(&p, &v6(PUBLIC6, next, &[0; 32])),
            Err(DropReason::Protocol),
            "next header {next}"
        );
    }
    // echo reply, unreachable, redirect, timestamp; echo with a code
    for (t, c) in [(0u8, 0u8), (3, 3), (5, 0), (13, 0), (8, 1)] {
        assert_eq!(
            check(&p, &v4(PUBLIC4, 1, &[t, c, 0, 0, 0, 0, 0, 0])),
            Err(DropReason::Icmp)
        );
    }
    for (t, c) in [(129u8, 0u8), (1, 4), (2, 0), (137, 0), (128, 1), (143, 0)] {
        assert_eq!(
            check(&p, &v6(PUBLIC6, 58, &[t, c, 0, 0, 0, 0, 0, 0])),
            Err(DropReason::Icmp),
            "icmpv6 {t}/{c}"
        );
    }
}

#[test]
fn arp_only_asks_for_the_gateway() {
    let p = default_policy();
    assert_eq!(check(&p, &arp(1, GUEST_MAC, GUEST4, GW4)), Ok(()));
    assert_eq!(check(&p, &arp(1, GUEST_MAC, GUEST4, DNS4)), Ok(()));
    assert_eq!(check(&p, &arp(2, GUEST_MAC, GUEST4, GW4)), Ok(()));
    // for anyone else on the link, a reply to anyone else, other operations
    assert_eq!(
        check(&p, &arp(1, GUEST_MAC, GUEST4, Ipv4Addr::new(10, 0, 2, 7))),
        Err(DropReason::Arp)
    );
    assert_eq!(
        check(&p, &arp(2, GUEST_MAC, GUEST4, DNS4)),
        Err(DropReason::Arp)
    );
    assert_eq!(
        check(&p, &arp(3, GUEST_MAC, GUEST4, GW4)),
        Err(DropReason::Arp)
    );
    // gratuitous ARP, a probe, someone else's addresses
    assert_eq!(
        check(&p, &arp(1, GUEST_MAC, GUEST4, GUEST4)),
        Err(DropReason::Arp)
    );
    assert_eq!(
        check(&p, &arp(1, GUEST_MAC, Ipv4Addr::UNSPECIFIED, GW4)),
        Err(DropReason::SpoofedSource)
    );
    assert_eq!(
        check(&p, &arp(1, OTHER_MAC, GUEST4, GW4)),
        Err(DropReason::SpoofedSource)
    );
    // not Ethernet/IPv4 ARP
    let mut f = arp(1, GUEST_MAC, GUEST4, GW4);
    f[14 + 1] = 6;
    assert_eq!(check(&p, &f), Err(DropReason::Arp));
}

#[test]
fn vlan_unknown_ethertypes_and_group_macs_are_dropped() {
    let p = default_policy();
    for tag in [0x8100u16, 0x88a8, 0x9100] {
        let mut inner = vec![0, 5];
        inner.extend_from_slice(&0x0800u16.to_be_bytes());
        inner.extend(ipv4(GUEST4, PUBLIC4, 6, &tcp(80)));
        assert_eq!(
            check(&p, &eth(GW_MAC, GUEST_MAC, tag, &inner)),
            Err(DropReason::VlanTagged)
        );
    }
    for ethertype in [0x88ccu16, 0x8035, 0x0842, 0x8863, 0x0600, 0x002e] {
        assert_eq!(
            check(&p, &eth(GW_MAC, GUEST_MAC, ethertype, &[0; 46])),
            Err(DropReason::EtherType)
        );
    }
    let mut f = tcp4(PUBLIC4, 80);
    f[..6].copy_from_slice(&BCAST);
    assert_eq!(check(&p, &f), Err(DropReason::Broadcast));
    f[..6].copy_from_slice(&[0x01, 0x00, 0x5e, 0, 0, 1]);
    assert_eq!(check(&p, &f), Err(DropReason::Multicast));
    let mut f = tcp6(PUBLIC6, 80);
    f[..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    assert_eq!(check(&p, &f), Err(DropReason::Multicast));
}

#[test]
fn neighbour_discovery_with_the_gateway_only() {
    let p = default_policy();
    let ll = eui64_link_local(GUEST_MAC);
    let all_routers: Ipv6Addr = "ff02::2".parse().unwrap();
    let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
    let sll = sll_option(GUEST_MAC);
    // finding the gateway: multicast and unicast solicitations, with and without our MAC
    assert_eq!(
        check(&p, &nd(135, ll, solicited(GW6), Some(GW6), &sll)),
        Ok(())
    );
    assert_eq!(check(&p, &nd(135, ll, GW6, Some(GW6), &[])), Ok(()));
    assert_eq!(
        check(&p, &nd(135, GUEST6, solicited(GW6), Some(GW6), &sll)),
        Ok(())
    );
    assert_eq!(check(&p, &nd(133, ll, all_routers, None, &sll)), Ok(()));
    // duplicate address detection of its own addresses
    let dad = |t: Ipv6Addr| nd(135, Ipv6Addr::UNSPECIFIED, solicited(t), Some(t), &[]);
    assert_eq!(check(&p, &dad(ll)), Ok(()));
    assert_eq!(check(&p, &dad(GUEST6)), Ok(()));
    assert_eq!(check(&p, &dad(PUBLIC6)), Err(DropReason::Icmp));
    // advertising itself, solicited or not
    let mut tll = sll.clone();
    tll[0] = 2;
    assert_eq!(check(&p, &nd(136, ll, GW6, Some(ll), &tll)), Ok(()));
    assert_eq!(
        check(&p, &nd(136, ll, all_nodes, Some(GUEST6), &[])),
        Ok(())
    );
    // someone else's address, or towards anyone but the gateway
    assert_eq!(
        check(&p, &nd(136, ll, GW6, Some(PUBLIC6), &[])),
        Err(DropReason::Icmp)
    );
    assert_eq!(
        check(&p, &nd(136, ll, PUBLIC6, Some(ll), &[])),
        Err(DropReason::Icmp)
    );
    let other: Ipv6Addr = "fe80::99".parse().unwrap();
    assert_eq!(
        check(&p, &nd(135, ll, solicited(other), Some(other), &sll)),
        Err(DropReason::Icmp)
    );
    assert_eq!(
        check(&p, &nd(135, ll, PUBLIC6, Some(GW6), &sll)),
        Err(DropReason::Icmp)
    );
    assert_eq!(
        check(&p, &nd(133, ll, all_nodes, None, &[])),
        Err(DropReason::Icmp)
    );
    // spoofed: another source address, another MAC in the option, the unspecified source outside DAD
    assert_eq!(
        check(&p, &nd(135, other, GW6, Some(GW6), &[])),
        Err(DropReason::SpoofedSource)
    );
    assert_eq!(
        check(&p, &nd(135, ll, GW6, Some(GW6), &sll_option(OTHER_MAC))),
        Err(DropReason::SpoofedMac)
    );
    assert_eq!(
        check(&p, &nd(133, Ipv6Addr::UNSPECIFIED, all_routers, None, &[])),
        Err(DropReason::SpoofedSource)
    );
    // malformed options: zero length, running past the end
    assert_eq!(
        check(&p, &nd(135, ll, GW6, Some(GW6), &[1, 0, 0, 0, 0, 0, 0, 0])),
        Err(DropReason::Malformed)
    );
    assert_eq!(
        check(&p, &nd(135, ll, GW6, Some(GW6), &[1, 2, 0, 0, 0, 0, 0, 0])),
        Err(DropReason::Malformed)
    );
    // a code other than 0
    let mut f = nd(133, ll, all_routers, None, &[]);
    f[14 + 40 + 1] = 1;
    assert_eq!(check(&p, &f), Err(DropReason::Icmp));
}

/// Frames that pass, of every kind the policy parses.
fn valid_frames() -> Vec<Vec<u8>> {
    let ll = eui64_link_local(GUEST_MAC);
    vec![
        tcp4(PUBLIC4, 443),
        v4(PUBLIC4, 17, &udp(443, b"payload")),
        v4(PUBLIC4, 1, &ECHO4),
        v4(DNS4, 17, &udp(53, b"query")),
        tcp6(PUBLIC6, 443),
        v6(PUBLIC6, 17, &udp(443, b"payload")),
        v6(PUBLIC6, 58, &ECHO6),
        arp(1, GUEST_MAC, GUEST4, GW4),
        nd(135, ll, solicited(GW6), Some(GW6), &sll_option(GUEST_MAC)),
        nd(133, ll, "ff02::2".parse().unwrap(), None, &[]),
    ]
}

#[test]
fn truncated_frames_are_malformed_at_every_length() {
    let p = default_policy();
    for frame in valid_frames() {
        assert_eq!(check(&p, &frame), Ok(()), "{frame:02x?}");
        for cut in 0..frame.len() {
            assert_eq!(
                check(&p, &frame[..cut]),
                Err(DropReason::Malformed),
                "{cut} bytes of {frame:02x?}"
            );
        }
    }
    // length fields that disagree with the frame
    let mut f = tcp4(PUBLIC4, 80);
    f[14 + 2..14 + 4].copy_from_slice(&19u16.to_be_bytes());
    assert_eq!(check(&p, &f), Err(DropReason::Malformed));
    let mut f = tcp4(PUBLIC4, 80);
    f[14] = 0x44;
    assert_eq!(check(&p, &f), Err(DropReason::Malformed));
    let mut f = tcp4(PUBLIC4, 80);
    f[14] = 0x65;
    assert_eq!(check(&p, &f), Err(DropReason::Malformed));
    let mut f = tcp4(PUBLIC4, 80);
    f[14 + 20 + 12] = 0x40; // TCP data offset 16 bytes
    assert_eq!(check(&p, &f), Err(DropReason::Malformed));
    let mut f = tcp4(PUBLIC4, 80);
    f[14 + 20 + 12] = 0xf0; // 60 bytes: more than the segment
    assert_eq!(check(&p, &f), Err(DropReason::Malformed));
    let mut f = v4(PUBLIC4, 17, &udp(53, b"abc"));
    f[14 + 20 + 5] = 7; // UDP length under its header
    assert_eq!(check(&p, &f), Err(DropReason::Malformed));
    let mut f = v6(PUBLIC6, 17, &udp(53, b"abc"));
    f[14 + 5] = 200; // IPv6 payload length past the frame
    assert_eq!(check(&p, &f), Err(DropReason::Malformed));
    let mut f = tcp6(PUBLIC6, 80);
    f[14] = 0x40;
    assert_eq!(check(&p, &f), Err(DropReason::Malformed));
}

/// xorshift64: a fixed sequence, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_and_mutated_frames_never_panic() {
    let mut p = allow_policy(&["proxy.example.com:443", "10.0.0.0/8", "[2a00::1]:80"]);
    let valid = valid_frames();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut allowed = 0u64;
    for i in 0..6000 {
        let frame: Vec<u8> = if i % 3 == 0 {
            let len = (rng.next() % 200) as usize;
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            let mut f = valid[(rng.next() % valid.len() as u64) as usize].clone();
            // keep our own MAC most of the time so that the mutations reach the IP layer
            for _ in 0..=(rng.next() % 4) {
                let at = (rng.next() % f.len() as u64) as usize;
                if at >= 12 || i % 2 == 0 {
                    f[at] = rng.next() as u8;
                }
            }
            if rng.next() % 4 == 0 {
                f.truncate((rng.next() % (f.len() as u64 + 1)) as usize);
            }
            f
        };
        if p.check_egress(&frame).is_ok() {
            allowed += 1;
        }
        // the rx path parses the same bytes
        p.observe_ingress(&frame);
    }
    let c = p.counters();
    assert_eq!(c.allowed_frames, allowed);
    assert_eq!(c.allowed_frames + c.dropped_total(), 6000);
}

#[test]
fn drops_are_counted_per_reason() {
    let mut p = default_policy();
    let mut f = tcp4(PUBLIC4, 80);
    assert_eq!(p.check_egress(&f), Ok(()));
    f[6] ^= 2;
    assert_eq!(p.check_egress(&f), Err(DropReason::SpoofedMac));
    assert_eq!(p.check_egress(&f), Err(DropReason::SpoofedMac));
    assert_eq!(
        p.check_egress(&tcp4(Ipv4Addr::new(169, 254, 169, 254), 80)),
        Err(DropReason::Metadata)
    );
    assert_eq!(p.check_egress(&[]), Err(DropReason::Malformed));
    let c = p.counters();
    assert_eq!(c.allowed_frames, 1);
    assert_eq!(c.dropped(DropReason::SpoofedMac), 2);
    assert_eq!(c.dropped(DropReason::Metadata), 1);
    assert_eq!(c.dropped(DropReason::Malformed), 1);
    assert_eq!(c.dropped(DropReason::Private), 0);
    assert_eq!(c.dropped_total(), 4);
    // every reason has its own counter name
    let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.counter_name()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), DropReason::ALL.len());
}

#[test]
fn parse_allow_accepts_the_cli_forms() {
    let cases: &[(&str, Target, Option<u16>)] = &[
        ("example.com", Target::Host("example.com".into()), None),
        (
            "Proxy.Golang.org.:443",
            Target::Host("proxy.golang.org".into()),
            Some(443),
        ),
        ("my_host-1", Target::Host("my_host-1".into()), None),
        ("1.2.3.4", net("1.2.3.4", 32), None),
        ("1.2.3.4:8080", net("1.2.3.4", 32), Some(8080)),
        ("10.0.0.0/8", net("10.0.0.0", 8), None),
        ("10.0.0.0/8:443", net("10.0.0.0", 8), Some(443)),
        ("0.0.0.0/0", net("0.0.0.0", 0), None),
        ("2a00:1450::1", net("2a00:1450::1", 128), None),
        ("2a00:1450::/32", net("2a00:1450::", 32), None),
        ("[2a00:1450::1]:443", net("2a00:1450::1", 128), Some(443)),
        ("[2a00:1450::/32]:443", net("2a00:1450::", 32), Some(443)),
        ("[::1]", net("::1", 128), None),
        ("::ffff:1.2.3.4", net("::ffff:1.2.3.4", 128), None),
    ];
    for (text, target, port) in cases {
        let e = Policy::parse_allow(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(&e.target, target, "{text}");
        assert_eq!(&e.port, port, "{text}");
        // what it prints parses back to the same entry
        assert_eq!(Policy::parse_allow(&e.to_string()).unwrap(), e, "{text}");
    }
}

fn net(addr: &str, prefix: u8) -> Target {
    Target::Net {
        addr: addr.parse().unwrap(),
        prefix,
    }
}

#[test]
fn parse_allow_refuses_mistakes_in_one_line() {
    use AllowError::*;
    type Expect = fn(&AllowError) -> bool;
    let cases: &[(&str, Expect)] = &[
        ("", |e| matches!(e, Empty)),
        ("  ", |e| matches!(e, Empty)),
        ("[2a00::1:443", |e| matches!(e, MissingBracket(_))),
        ("[2a00::1]443", |e| matches!(e, AfterBracket(_))),
        ("[1.2.3.4]:80", |e| matches!(e, BracketedNotIpv6(_))),
        ("[example.com]:80", |e| matches!(e, BracketedNotIpv6(_))),
        ("example.com:0", |e| matches!(e, BadPort(_))),
        ("example.com:65536", |e| matches!(e, BadPort(_))),
        ("example.com:+80", |e| matches!(e, BadPort(_))),
        ("example.com:", |e| matches!(e, BadPort(_))),
        ("[2a00::1]:x", |e| matches!(e, BadPort(_))),
        ("2a00::1:443:", |e| matches!(e, BadIpv6(_))),
        ("2a00:::1", |e| matches!(e, BadIpv6(_))),
        ("1.2.3.999", |e| matches!(e, BadIpv4(_))),
        ("1.2.3", |e| matches!(e, BadIpv4(_))),
        ("10.0.0.0/33", |e| matches!(e, BadPrefix(_))),
        ("10.0.0.0/+8", |e| matches!(e, BadPrefix(_))),
        ("2a00::/129", |e| matches!(e, BadPrefix(_))),
        (
            "10.0.0.1/8",
            |e| matches!(e, HostBits(_, s) if s == "10.0.0.0/8"),
        ),
        ("*.example.com", |e| matches!(e, BadHostName(_))),
        ("exa mple.com", |e| matches!(e, BadHostName(_))),
        ("-bad.example", |e| matches!(e, BadHostName(_))),
        ("a..b", |e| matches!(e, BadHostName(_))),
        ("example.123", |e| matches!(e, BadHostName(_))),
        ("10.0.0.0/8/9", |e| matches!(e, BadPrefix(_))),
    ];
    for (text, ok) in cases {
        let e = Policy::parse_allow(text).expect_err(text);
        assert!(ok(&e), "{text}: {e:?}");
        let line = e.to_string();
        assert!(
            !line.contains('\n') && line.starts_with("--net-allow"),
            "{line}"
        );
    }
    let long = format!("{}.com", "a".repeat(64));
    assert!(Policy::parse_allow(&long).is_err());
}

#[test]
fn allowlist_admits_only_what_it_names() {
    let p = allow_policy(&[
        "93.184.216.34:443",
        "10.0.0.0/8",
        "169.254.169.254:80",
        "[2606:2800:220:1::1946]:443",
    ]);
    assert_eq!(check(&p, &tcp4(PUBLIC4, 443)), Ok(()));
    assert_eq!(check(&p, &v4(PUBLIC4, 17, &udp(443, b""))), Ok(()));
    assert_eq!(check(&p, &tcp4(PUBLIC4, 80)), Err(DropReason::NotAllowed));
    // an entry with a port does not admit echo
    assert_eq!(
        check(&p, &v4(PUBLIC4, 1, &ECHO4)),
        Err(DropReason::NotAllowed)
    );
    assert_eq!(
        check(&p, &tcp4(Ipv4Addr::new(1, 1, 1, 1), 443)),
        Err(DropReason::NotAllowed)
    );
    // private and link-local, named explicitly
    assert_eq!(check(&p, &tcp4(Ipv4Addr::new(10, 9, 8, 7), 22)), Ok(()));
    assert_eq!(
        check(&p, &v4(Ipv4Addr::new(10, 9, 8, 7), 1, &ECHO4)),
        Ok(())
    );
    assert_eq!(
        check(&p, &tcp4(Ipv4Addr::new(169, 254, 169, 254), 80)),
        Ok(())
    );
    // and not named: dropped with the range's own reason
    assert_eq!(
        check(&p, &tcp4(Ipv4Addr::new(192, 168, 0, 1), 443)),
        Err(DropReason::Private)
    );
    assert_eq!(
        check(&p, &tcp4(Ipv4Addr::new(169, 254, 169, 254), 443)),
        Err(DropReason::Metadata)
    );
    assert_eq!(check(&p, &tcp6(PUBLIC6, 443)), Ok(()));
    assert_eq!(check(&p, &tcp6(PUBLIC6, 80)), Err(DropReason::NotAllowed));
    // the guest's own address stays out of reach, even inside a named range
    assert_eq!(check(&p, &tcp4(GUEST4, 80)), Err(DropReason::OwnAddress));
    // the rules before the destination still apply
    let mut f = tcp4(PUBLIC4, 443);
    f[14 + 6] = 0x20;
    assert_eq!(check(&p, &f), Err(DropReason::Fragment));
}

/// A DNS answer from the forwarder to the guest, as passt sends it.
fn dns_answer4(message: &[u8]) -> Vec<u8> {
    let mut u = vec![0, 53, 0xc3, 0x51];
    u.extend_from_slice(&((8 + message.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(message);
    eth(GUEST_MAC, GW_MAC, 0x0800, &ipv4(DNS4, GUEST4, 17, &u))
}

fn dns_answer6(message: &[u8]) -> Vec<u8> {
    let mut u = vec![0, 53, 0xc3, 0x51];
    u.extend_from_slice(&((8 + message.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(message);
    eth(GUEST_MAC, GW_MAC, 0x86dd, &ipv6(DNS6, GUEST6, 17, &u))
}

fn a(ip: [u8; 4]) -> (Vec<u8>, u16, Vec<u8>) {
    (TO_QUESTION.to_vec(), 1, ip.to_vec())
}

#[test]
fn host_names_admit_the_addresses_their_answers_gave() {
    let mut p = allow_policy(&["proxy.example.com:443"]);
    let target = Ipv4Addr::new(151, 101, 1, 1);
    assert_eq!(check(&p, &tcp4(target, 443)), Err(DropReason::NotAllowed));
    p.observe_ingress(&dns_answer4(&response(
        "Proxy.Example.COM",
        &[a(target.octets())],
    )));
    assert_eq!(check(&p, &tcp4(target, 443)), Ok(()));
    // the entry's port holds for learned addresses too
    assert_eq!(check(&p, &tcp4(target, 80)), Err(DropReason::NotAllowed));
    // a later, different answer adds to the first: connections made from the older answer still work
    let second = Ipv4Addr::new(151, 101, 65, 1);
    p.observe_ingress(&dns_answer4(&response(
        "proxy.example.com",
        &[a(second.octets())],
    )));
    assert_eq!(check(&p, &tcp4(target, 443)), Ok(()));
    assert_eq!(check(&p, &tcp4(second, 443)), Ok(()));
    // AAAA over IPv6
    let mut aaaa = PUBLIC6.octets().to_vec();
    aaaa.truncate(16);
    p.observe_ingress(&dns_answer6(&response(
        "proxy.example.com",
        &[(TO_QUESTION.to_vec(), 28, aaaa)],
    )));
    assert_eq!(check(&p, &tcp6(PUBLIC6, 443)), Ok(()));
    assert_eq!(p.counters().dns_learned, 3);
    // answers for other names admit nothing
    let other = Ipv4Addr::new(8, 8, 4, 4);
    p.observe_ingress(&dns_answer4(&response(
        "evil.example",
        &[a(other.octets())],
    )));
    assert_eq!(check(&p, &tcp4(other, 443)), Err(DropReason::NotAllowed));
    // with a default policy nothing is learned (everything public passes anyway)
    let mut d = default_policy();
    d.observe_ingress(&dns_answer4(&response(
        "proxy.example.com",
        &[a(target.octets())],
    )));
    assert!(d.learned().is_empty());
}

#[test]
fn host_names_follow_cname_chains_but_nothing_else() {
    let mut p = allow_policy(&["proxy.example.com"]);
    let cdn = Ipv4Addr::new(151, 101, 1, 1);
    let smuggled = Ipv4Addr::new(6, 6, 6, 6);
    let m = response(
        "proxy.example.com",
        &[
            (TO_QUESTION.to_vec(), 5, name("edge.cdn.example")),
            (name("edge.cdn.example"), 5, name("a1.cdn.example")),
            (name("a1.cdn.example"), 1, cdn.octets().to_vec()),
            // not on the chain: a resolver's extra records prove nothing
            (name("unrelated.example"), 1, smuggled.octets().to_vec()),
        ],
    );
    p.observe_ingress(&dns_answer4(&m));
    assert_eq!(check(&p, &tcp4(cdn, 443)), Ok(()));
    assert_eq!(check(&p, &tcp4(smuggled, 443)), Err(DropReason::NotAllowed));
    // a chain that starts at another name does not reach the allowed one's records
    let mut p = allow_policy(&["proxy.example.com"]);
    let m = response(
        "evil.example",
        &[
            (TO_QUESTION.to_vec(), 5, name("proxy.example.com")),
            (name("proxy.example.com"), 1, smuggled.octets().to_vec()),
        ],
    );
    p.observe_ingress(&dns_answer4(&m));
    assert!(p.learned().is_empty());
}

#[test]
fn host_names_never_admit_private_addresses_or_forged_answers() {
    let mut p = allow_policy(&["proxy.example.com"]);
    // DNS rebinding: the name's answer points into the host's networks
    for ip in [
        [169, 254, 169, 254],
        [127, 0, 0, 1],
        [10, 0, 2, 2],
        [192, 168, 1, 1],
    ] {
        p.observe_ingress(&dns_answer4(&response("proxy.example.com", &[a(ip)])));
        assert!(check(&p, &tcp4(Ipv4Addr::from(ip), 443)).is_err());
    }
    assert_eq!(p.counters().dns_refused_answers, 4);
    assert!(p.learned().is_empty());
    let good = response("proxy.example.com", &[a([151, 101, 1, 1])]);
    // not from the forwarder, not from port 53, not to the guest, a fragment, TCP, an error answer
    let mut f = dns_answer4(&good);
    f[14 + 12..14 + 16].copy_from_slice(&[1, 1, 1, 1]);
    p.observe_ingress(&f);
    let mut f = dns_answer4(&good);
    f[14 + 20 + 1] = 54;
    p.observe_ingress(&f);
    let mut f = dns_answer4(&good);
    f[14 + 16..14 + 20].copy_from_slice(&[10, 0, 2, 16]);
    p.observe_ingress(&f);
    let mut f = dns_answer4(&good);
    f[14 + 6] = 0x20;
    p.observe_ingress(&f);
    let mut f = dns_answer4(&good);
    f[14 + 9] = 6;
    p.observe_ingress(&f);
    let mut bad = good.clone();
    bad[3] = 0x83;
    p.observe_ingress(&dns_answer4(&bad));
    assert!(p.learned().is_empty());
    p.observe_ingress(&dns_answer4(&good));
    assert_eq!(
        p.learned(),
        vec![(IpAddr::V4(Ipv4Addr::new(151, 101, 1, 1)), None)]
    );
}

#[test]
fn learned_addresses_are_capped() {
    let mut p = allow_policy(&["proxy.example.com"]);
    let mut n = 0u32;
    while n < policy::MAX_LEARNED as u32 + 100 {
        let answers: Vec<_> = (0..50)
            .map(|i| {
                let ip = 0x2000_0000u32 + n + i;
                a(ip.to_be_bytes())
            })
            .collect();
        p.observe_ingress(&dns_answer4(&response("proxy.example.com", &answers)));
        n += 50;
    }
    assert_eq!(p.learned().len(), policy::MAX_LEARNED);
    assert!(p.counters().dns_learned_over_cap >= 100);
}
