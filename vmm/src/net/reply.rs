//! The answer to a refused TCP segment: a reset, as if the destination had refused the connection.
//!
//! A silently dropped SYN leaves the guest's `connect` retrying for about two minutes; a build that
//! tries a denied mirror first should fail over at once. So for a TCP segment the policy drops because
//! of where it goes (never for a spoofed or malformed one: the reset would go to an address that is
//! not the guest's), the device hands the guest a RST from that destination (RFC 9293, 3.10.7.1):
//! `connect` fails with ECONNREFUSED.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::policy::ETH_HEADER_LEN;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const TCP_HEADER_LEN: usize = 20;

/// The RST that answers `frame`, a TCP segment from the guest without IPv4 options or IPv6 extension
/// headers (the policy refuses those before looking at destinations). None if `frame` is no such
/// segment, or is itself a reset (which is never answered).
pub fn tcp_reset(frame: &[u8]) -> Option<Vec<u8>> {
    let (eth, packet) = frame.split_at_checked(ETH_HEADER_LEN)?;
    let ethertype = u16::from_be_bytes([*eth.get(12)?, *eth.get(13)?]);
    match ethertype {
        ETHERTYPE_IPV4 => {
            if packet.first()? & 0xf != 5 || *packet.get(9)? != PROTO_TCP {
                return None;
            }
            let total_len = usize::from(be16(packet, 2)?);
            let segment = packet.get(20..total_len)?;
            let src = Ipv4Addr::from(<[u8; 4]>::try_from(packet.get(12..16)?).ok()?);
            let dst = Ipv4Addr::from(<[u8; 4]>::try_from(packet.get(16..20)?).ok()?);
            let tcp = reset_segment(segment)?;
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&u16::try_from(20 + tcp.len()).ok()?.to_be_bytes());
            // id 0, DF, TTL 64, TCP, checksum filled in below
            ip.extend_from_slice(&[0, 0, 0x40, 0, 64, PROTO_TCP, 0, 0]);
            ip.extend_from_slice(&dst.octets());
            ip.extend_from_slice(&src.octets());
            let header_sum = checksum(&[&ip]);
            ip.get_mut(10..12)?
                .copy_from_slice(&header_sum.to_be_bytes());
            let tcp = with_tcp_checksum(tcp, &[&dst.octets(), &src.octets()], &[0, PROTO_TCP])?;
            ip.extend_from_slice(&tcp);
            Some(ethernet(eth, ETHERTYPE_IPV4, &ip))
        }
        ETHERTYPE_IPV6 => {
            if *packet.get(6)? != PROTO_TCP {
                return None;
            }
            let payload_len = usize::from(be16(packet, 4)?);
            let segment = packet.get(40..40 + payload_len)?;
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(packet.get(8..24)?).ok()?);
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(packet.get(24..40)?).ok()?);
            let tcp = reset_segment(segment)?;
            let len = u32::try_from(tcp.len()).ok()?;
            let tcp = with_tcp_checksum(
                tcp,
                &[&dst.octets(), &src.octets(), &len.to_be_bytes()],
                &[0, 0, 0, PROTO_TCP],
            )?;
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&u16::try_from(tcp.len()).ok()?.to_be_bytes());
            ip.extend_from_slice(&[PROTO_TCP, 64]);
            ip.extend_from_slice(&dst.octets());
            ip.extend_from_slice(&src.octets());
            ip.extend_from_slice(&tcp);
            Some(ethernet(eth, ETHERTYPE_IPV6, &ip))
        }
        _ => None,
    }
}

/// The TCP header of the reset for `segment` (RFC 9293, 3.10.7.1), checksum zero.
fn reset_segment(segment: &[u8]) -> Option<Vec<u8>> {
    let header = segment.get(..TCP_HEADER_LEN)?;
    let data_offset = usize::from(header[12] >> 4) * 4;
    let flags = header[13];
    if flags & TCP_RST != 0 || data_offset < TCP_HEADER_LEN || data_offset > segment.len() {
        return None;
    }
    let seq = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let ack = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
    let data_len = u32::try_from(segment.len() - data_offset).ok()?;
    let (reply_seq, reply_ack, reply_flags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let syn_fin = u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        (
            0,
            seq.wrapping_add(data_len).wrapping_add(syn_fin),
            TCP_RST | TCP_ACK,
        )
    };
    let mut tcp = Vec::with_capacity(TCP_HEADER_LEN);
    // ports swapped
    tcp.extend_from_slice(&header[2..4]);
    tcp.extend_from_slice(&header[0..2]);
    tcp.extend_from_slice(&reply_seq.to_be_bytes());
    tcp.extend_from_slice(&reply_ack.to_be_bytes());
    tcp.extend_from_slice(&[0x50, reply_flags, 0, 0, 0, 0, 0, 0]);
    Some(tcp)
}

/// `tcp` with its checksum over the pseudo-header (`addresses`, then the zero and protocol bytes
/// `proto`, then for IPv4 the length, which is added here).
fn with_tcp_checksum(mut tcp: Vec<u8>, addresses: &[&[u8]], proto: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(tcp.len()).ok()?.to_be_bytes();
    let sum = if addresses.len() == 2 {
        checksum(&[addresses[0], addresses[1], proto, &len, &tcp])
    } else {
        // IPv6: the 32-bit length is one of `addresses`
        let mut parts: Vec<&[u8]> = addresses.to_vec();
        parts.push(proto);
        parts.push(&tcp);
        checksum(&parts)
    };
    tcp.get_mut(16..18)?.copy_from_slice(&sum.to_be_bytes());
    Some(tcp)
}

/// A frame back to the guest: the guest's frame's addresses swapped.
fn ethernet(guest_eth: &[u8], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HEADER_LEN + payload.len());
    f.extend_from_slice(guest_eth.get(6..12).unwrap_or(&[0; 6]));
    f.extend_from_slice(guest_eth.get(..6).unwrap_or(&[0; 6]));
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

/// The Internet checksum (RFC 1071) of the concatenation of `parts`, each of even length but the last.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u64;
    for part in parts {
        let mut words = part.chunks_exact(2);
        for w in &mut words {
            sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [last] = words.remainder() {
            sum += u64::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // folded to 16 bits just above
    !u16::try_from(sum).unwrap_or(0xffff)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test data is small
mod tests {
    use super::*;

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const GW_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];

    fn segment(flags: u8, seq: u32, ack: u32, data: &[u8]) -> Vec<u8> {
        let mut t = vec![0xc3, 0x50, 0x01, 0xbb];
        t.extend_from_slice(&seq.to_be_bytes());
        t.extend_from_slice(&ack.to_be_bytes());
        t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        t.extend_from_slice(data);
        t
    }

    fn v4(tcp: &[u8]) -> Vec<u8> {
        let mut f = GW_MAC.to_vec();
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        f.extend_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 2, 15, 1, 2, 3, 4]);
        f.extend_from_slice(tcp);
        f
    }

    fn v6(tcp: &[u8]) -> Vec<u8> {
        let mut f = GW_MAC.to_vec();
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        f.extend_from_slice(&[6, 64]);
        f.extend_from_slice(&"2a01:4f8::15".parse::<Ipv6Addr>().unwrap().octets());
        f.extend_from_slice(&"2606:2800::1".parse::<Ipv6Addr>().unwrap().octets());
        f.extend_from_slice(tcp);
        f
    }

    #[test]
    fn a_syn_gets_a_reset_from_its_destination_with_valid_checksums() {
        let rst = tcp_reset(&v4(&segment(TCP_SYN, 1000, 0, &[]))).unwrap();
        assert_eq!(&rst[..6], &GUEST_MAC);
        assert_eq!(&rst[6..12], &GW_MAC);
        let ip = &rst[14..];
        assert_eq!(&ip[12..16], &[1, 2, 3, 4]);
        assert_eq!(&ip[16..20], &[10, 0, 2, 15]);
        assert_eq!(checksum(&[&ip[..20]]), 0, "IPv4 header checksum");
        let tcp = &ip[20..];
        assert_eq!(&tcp[..4], &[0x01, 0xbb, 0xc3, 0x50]);
        assert_eq!(u32::from_be_bytes(tcp[8..12].try_into().unwrap()), 1001);
        assert_eq!(tcp[13], TCP_RST | TCP_ACK);
        let len = (tcp.len() as u16).to_be_bytes();
        assert_eq!(
            checksum(&[&ip[12..16], &ip[16..20], &[0, 6], &len, tcp]),
            0,
            "TCP checksum"
        );
    }

    #[test]
    fn data_with_ack_gets_a_reset_at_its_ack_and_resets_are_not_answered() {
        let rst = tcp_reset(&v4(&segment(TCP_ACK, 5, 7777, b"hello"))).unwrap();
        let tcp = &rst[34..];
        assert_eq!(u32::from_be_bytes(tcp[4..8].try_into().unwrap()), 7777);
        assert_eq!(tcp[13], TCP_RST);
        assert_eq!(tcp_reset(&v4(&segment(TCP_RST, 1, 0, &[]))), None);
        assert_eq!(tcp_reset(&v4(&segment(TCP_RST | TCP_ACK, 1, 2, &[]))), None);
    }

    #[test]
    fn ipv6_resets_carry_a_valid_checksum() {
        let rst = tcp_reset(&v6(&segment(TCP_SYN | TCP_FIN, 10, 0, b"xy"))).unwrap();
        let ip = &rst[14..];
        let tcp = &ip[40..];
        assert_eq!(u32::from_be_bytes(tcp[8..12].try_into().unwrap()), 14);
        let len = (tcp.len() as u32).to_be_bytes();
        assert_eq!(
            checksum(&[&ip[8..24], &ip[24..40], &len, &[0, 0, 0, 6], tcp]),
            0
        );
    }

    #[test]
    fn anything_else_gets_no_answer_and_nothing_panics() {
        let good = v4(&segment(TCP_SYN, 1, 0, &[]));
        for cut in 0..good.len() {
            assert_eq!(tcp_reset(&good[..cut]), None, "{cut}");
        }
        let mut udp = good.clone();
        udp[14 + 9] = 17;
        assert_eq!(tcp_reset(&udp), None);
        let mut seed = 0xfeed_beef_u64;
        for _ in 0..5000 {
            let mut f = if seed % 2 == 0 {
                good.clone()
            } else {
                v6(&segment(TCP_SYN, 1, 0, &[]))
            };
            for _ in 0..3 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed % f.len() as u64) as usize;
                f[at] = (seed >> 32) as u8;
            }
            let _ = tcp_reset(&f);
        }
    }
}
