//! A small DNS response parser (RFC 1035), for the policy to learn which addresses an allowed host name
//! resolved to.
//!
//! The message comes from the network (passt's forwarder relays the host resolver's answer) and the
//! guest chose the question, so it is parsed as hostile input: every read is bounds-checked, a name
//! is at most 255 bytes on the wire, a compression pointer must point strictly backwards (so no loop)
//! and at most [`MAX_POINTERS`] are followed per name, and at most [`MAX_ANSWERS`] answer records are
//! read. Only what the policy needs is kept: the question name and the A, AAAA and CNAME answers.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Answer records read from one response; a real answer for one name has a handful.
pub const MAX_ANSWERS: usize = 64;
/// Compression pointers followed while reading one name.
pub const MAX_POINTERS: usize = 32;
/// Longest name on the wire (RFC 1035, 3.1), length bytes included.
const MAX_NAME_WIRE: usize = 255;
const HEADER_LEN: usize = 12;

const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

/// Why a message was not a usable response. None of these is an error anyone sees: the policy just
/// learns nothing from the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("the message ends inside a field")]
    Truncated,
    #[error("not a standard query response")]
    NotAResponse,
    #[error("the response carries error code {0}")]
    ErrorCode(u16),
    #[error("the response has {0} questions, not one")]
    QuestionCount(u16),
    #[error("a name is longer than 255 bytes")]
    NameTooLong,
    #[error("a compression pointer does not point backwards, or too many were followed")]
    BadPointer,
    #[error("a label has a reserved type")]
    BadLabel,
}

/// What an answer record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// The canonical name (lower case, no trailing dot), or None if it is no plain host name.
    Cname(Option<String>),
}

/// One answer record of class IN and type A, AAAA or CNAME.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Owner name (lower case, no trailing dot), or None if it is no plain host name: a label with a
    /// dot, a space or a control byte in it can never equal an allowed name, and must not be made to.
    pub name: Option<String>,
    pub data: RecordData,
}

/// The parts of a response the policy uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub question: Option<String>,
    pub answers: Vec<Answer>,
}

/// Parses a DNS response message (the UDP payload).
pub fn parse_response(msg: &[u8]) -> Result<Response, DnsError> {
    let flags = be16(msg, 2)?;
    let qr = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    if !qr || opcode != 0 {
        return Err(DnsError::NotAResponse);
    }
    let rcode = flags & 0xf;
    if rcode != 0 {
        return Err(DnsError::ErrorCode(rcode));
    }
    let qdcount = be16(msg, 4)?;
    if qdcount != 1 {
        return Err(DnsError::QuestionCount(qdcount));
    }
    let ancount = usize::from(be16(msg, 6)?);
    let (question, mut pos) = read_name(msg, HEADER_LEN)?;
    // QTYPE, QCLASS
    pos = skip(msg, pos, 4)?;
    let mut answers = Vec::new();
    for _ in 0..ancount.min(MAX_ANSWERS) {
        let (name, at) = read_name(msg, pos)?;
        let rtype = be16(msg, at)?;
        let class = be16(msg, at + 2)?;
        let rdlen = usize::from(be16(msg, at + 8)?);
        let rdata_at = at + 10;
        let rdata = msg
            .get(rdata_at..rdata_at + rdlen)
            .ok_or(DnsError::Truncated)?;
        pos = rdata_at + rdlen;
        if class != CLASS_IN {
            continue;
        }
        let data = match rtype {
            TYPE_A => match <[u8; 4]>::try_from(rdata) {
                Ok(octets) => RecordData::A(Ipv4Addr::from(octets)),
                Err(_) => continue,
            },
            TYPE_AAAA => match <[u8; 16]>::try_from(rdata) {
                Ok(octets) => RecordData::Aaaa(Ipv6Addr::from(octets)),
                Err(_) => continue,
            },
            // The target may use compression pointers into the whole message.
            TYPE_CNAME => RecordData::Cname(read_name(msg, rdata_at)?.0),
            _ => continue,
        };
        answers.push(Answer { name, data });
    }
    Ok(Response { question, answers })
}

fn be16(msg: &[u8], at: usize) -> Result<u16, DnsError> {
    let bytes = msg.get(at..at + 2).ok_or(DnsError::Truncated)?;
    Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
}

fn skip(msg: &[u8], at: usize, n: usize) -> Result<usize, DnsError> {
    let end = at.checked_add(n).ok_or(DnsError::Truncated)?;
    if end > msg.len() {
        return Err(DnsError::Truncated);
    }
    Ok(end)
}

/// Reads the name at `start`: returns it (None if it is no plain host name, see [`Answer::name`]) and
/// where the field after it starts.
fn read_name(msg: &[u8], start: usize) -> Result<(Option<String>, usize), DnsError> {
    let mut pos = start;
    let mut after = None;
    let mut pointers = 0;
    let mut wire = 0usize;
    let mut name = String::new();
    let mut plain = true;
    loop {
        let len = *msg.get(pos).ok_or(DnsError::Truncated)?;
        match len & 0xc0 {
            0x00 if len == 0 => {
                wire += 1;
                if wire > MAX_NAME_WIRE {
                    return Err(DnsError::NameTooLong);
                }
                let after = after.unwrap_or(pos + 1);
                return Ok((plain.then_some(name), after));
            }
            0x00 => {
                let len = usize::from(len);
                let label = msg.get(pos + 1..pos + 1 + len).ok_or(DnsError::Truncated)?;
                wire += 1 + len;
                if wire > MAX_NAME_WIRE {
                    return Err(DnsError::NameTooLong);
                }
                if label
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    if !name.is_empty() {
                        name.push('.');
                    }
                    name.extend(label.iter().map(|&b| char::from(b.to_ascii_lowercase())));
                } else {
                    plain = false;
                }
                pos += 1 + len;
            }
            0xc0 => {
                let low = *msg.get(pos + 1).ok_or(DnsError::Truncated)?;
                let target = usize::from(u16::from_be_bytes([len & 0x3f, low]));
                pointers += 1;
                // Strictly backwards: every jump lands earlier, so reading ends even without the cap.
                if target >= pos || pointers > MAX_POINTERS {
                    return Err(DnsError::BadPointer);
                }
                after.get_or_insert(pos + 2);
                pos = target;
            }
            _ => return Err(DnsError::BadLabel),
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test data is small
pub(crate) mod tests {
    use super::*;

    /// Encodes a name without compression.
    pub(crate) fn name(n: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in n.split('.').filter(|l| !l.is_empty()) {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    /// A response to `question` (type A) with the given answers: (owner wire bytes, type, rdata).
    pub(crate) fn response(question: &str, answers: &[(Vec<u8>, u16, Vec<u8>)]) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1];
        m.extend_from_slice(&(answers.len() as u16).to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        m.extend(name(question));
        m.extend_from_slice(&[0, 1, 0, 1]);
        for (owner, rtype, rdata) in answers {
            m.extend_from_slice(owner);
            m.extend_from_slice(&rtype.to_be_bytes());
            m.extend_from_slice(&[0, 1, 0, 0, 0x0e, 0x10]);
            m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            m.extend_from_slice(rdata);
        }
        m
    }

    /// A pointer to the question name, which starts at offset 12.
    pub(crate) const TO_QUESTION: [u8; 2] = [0xc0, 12];

    #[test]
    fn a_aaaa_and_cname_with_compression() {
        let m = response(
            "Proxy.Example.com",
            &[
                (TO_QUESTION.to_vec(), TYPE_CNAME, name("cdn.example.net")),
                (name("cdn.example.net"), TYPE_A, vec![93, 184, 216, 34]),
                (
                    name("cdn.example.net"),
                    TYPE_AAAA,
                    vec![0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                ),
                (TO_QUESTION.to_vec(), 16, b"\x04text".to_vec()),
            ],
        );
        let r = parse_response(&m).unwrap();
        assert_eq!(r.question.as_deref(), Some("proxy.example.com"));
        assert_eq!(r.answers.len(), 3);
        assert_eq!(r.answers[0].name.as_deref(), Some("proxy.example.com"));
        assert_eq!(
            r.answers[0].data,
            RecordData::Cname(Some("cdn.example.net".into()))
        );
        assert_eq!(
            r.answers[1].data,
            RecordData::A(Ipv4Addr::new(93, 184, 216, 34))
        );
        assert!(matches!(r.answers[2].data, RecordData::Aaaa(_)));
    }

    #[test]
    fn refuses_queries_errors_and_odd_question_counts() {
        let mut m = response("a.example", &[]);
        m[2] = 0x01; // QR clear: a query
        assert_eq!(parse_response(&m), Err(DnsError::NotAResponse));
        let mut m = response("a.example", &[]);
        m[3] = 0x83; // NXDOMAIN
        assert_eq!(parse_response(&m), Err(DnsError::ErrorCode(3)));
        let mut m = response("a.example", &[]);
        m[5] = 2;
        assert_eq!(parse_response(&m), Err(DnsError::QuestionCount(2)));
    }

    #[test]
    fn pointer_loops_and_forward_pointers_are_refused() {
        // the question name is a pointer to itself
        let mut m = vec![
            0, 0, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1,
        ];
        assert_eq!(parse_response(&m), Err(DnsError::BadPointer));
        // forward
        m[13] = 14;
        assert_eq!(parse_response(&m), Err(DnsError::BadPointer));
        // reserved label type
        m[12] = 0x80;
        assert_eq!(parse_response(&m), Err(DnsError::BadLabel));
    }

    #[test]
    fn long_names_and_odd_labels() {
        let long = vec!["a".repeat(63); 4].join(".");
        let m = response(&long, &[]);
        assert_eq!(parse_response(&m), Err(DnsError::NameTooLong));
        // a label holding a dot is not the name it looks like
        let mut m = vec![0, 0, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(b"\x0bexample.com\x00\x00\x01\x00\x01");
        assert_eq!(parse_response(&m).unwrap().question, None);
    }

    #[test]
    fn answer_count_is_capped_and_truncation_is_an_error() {
        let answers: Vec<_> = (0..200u8)
            .map(|i| (TO_QUESTION.to_vec(), TYPE_A, vec![1, 2, 3, i]))
            .collect();
        let m = response("a.example", &answers);
        assert_eq!(parse_response(&m).unwrap().answers.len(), MAX_ANSWERS);
        for cut in 0..m.len().min(80) {
            assert!(parse_response(&m[..cut]).is_err() || cut >= 12);
        }
    }

    #[test]
    fn random_messages_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let base = response(
            "proxy.example.com",
            &[(TO_QUESTION.to_vec(), TYPE_A, vec![1, 2, 3, 4])],
        );
        for i in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut m = if i % 2 == 0 {
                base.clone()
            } else {
                vec![0u8; (seed % 96) as usize]
            };
            for (j, byte) in m.iter_mut().enumerate() {
                if (seed >> (j % 61)) & 7 == 0 || i % 2 == 1 {
                    *byte = (seed >> (j % 56)) as u8 ^ j as u8;
                }
            }
            let _ = parse_response(&m);
        }
    }
}
