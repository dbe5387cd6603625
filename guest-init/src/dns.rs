//! The guest's DNS responder, without I/O: parsing one query, building the
//! answer, and the table of fake addresses handed out for allowed names.
//!
//! Wire format per RFC 1035 §4.1 (header, question, resource records) and
//! §4.1.4 (compression pointers). guest-init answers every query itself
//! (docs/decisions.md, "Egress"). Every class-IN question asks the host's
//! `Egress.resolve` ([`needs_resolve`]); [`verdict`] then answers: a name
//! that is not allowed gets `NXDOMAIN` whatever the type (so `A` and
//! `AAAA` agree, as resolvers expect); an allowed name gets, for `A`, an
//! address from [`FAKE_NET`] that [`FakeAddrs`] maps back to the name when
//! the guest connects to it, and for every other type (`AAAA` included:
//! the guest has no IPv6 route) `NOERROR` with no answers. Nothing here
//! panics on any input (tested with random bytes).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

/// The fake addresses: 198.18.0.0/15, reserved for benchmarking (RFC 2544,
/// RFC 6890), so no real destination is shadowed.
pub const FAKE_NET: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
/// Prefix length of [`FAKE_NET`].
pub const FAKE_PREFIX: u32 = 15;

/// Names the fake-address table holds at once; the least recently used
/// one is forgotten beyond this (a connection to its old address is then
/// reset, and a new query for it gets a fresh address).
pub const MAX_FAKE_NAMES: usize = 4096;

/// TTL of an `A` answer, seconds: short, so a forgotten name is asked
/// again soon.
pub const ANSWER_TTL: u32 = 30;

/// Longest DNS name, presentation form without the final dot (RFC 1035
/// §2.3.4: 255 octets on the wire).
pub const MAX_NAME: usize = 253;

/// Query type `A` (RFC 1035 §3.2.2).
pub const TYPE_A: u16 = 1;
/// Query type `AAAA` (RFC 3596).
pub const TYPE_AAAA: u16 = 28;
/// Class `IN`.
pub const CLASS_IN: u16 = 1;

/// Response codes (RFC 1035 §4.1.1 `RCODE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rcode {
    /// 0: no error.
    NoError = 0,
    /// 1: the query could not be interpreted.
    FormErr = 1,
    /// 2: the server could not answer (the host's `Egress` is unreachable).
    ServFail = 2,
    /// 3: the name does not exist (here: no rule could allow it).
    NxDomain = 3,
    /// 4: the kind of query (opcode) is not supported.
    NotImp = 4,
}

/// One parsed query: the header fields an answer echoes, and its single
/// question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// The query id.
    pub id: u16,
    /// The opcode (0 = standard query).
    pub opcode: u8,
    /// Recursion desired (copied into the answer).
    pub rd: bool,
    /// The name asked for, lower-case, without the final dot; labels are
    /// letters, digits, `-` and `_` only (anything else makes the query
    /// [`Parsed::Refuse`]d with `NXDOMAIN`). The root name is `""`.
    pub name: String,
    /// The question's type (`QTYPE`).
    pub qtype: u16,
    /// The question's class (`QCLASS`).
    pub qclass: u16,
    /// The question as it was on the wire (name, type, class), echoed in
    /// the answer.
    pub question: Vec<u8>,
}

/// What [`parse`] makes of a datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A standard query with one question we can judge.
    Query(Query),
    /// Answer at once with this code and no answer records: `FORMERR` (the
    /// header parsed, the rest did not), `NOTIMP` (an opcode other than
    /// QUERY), `NXDOMAIN` (a name with bytes the host protocol does not
    /// carry). The reply echoes the question when it parsed.
    Refuse(Vec<u8>),
    /// Not worth an answer (shorter than a header, or itself a response).
    Drop,
}

const HEADER: usize = 12;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parses one query datagram (RFC 1035 §4.1). Any additional records (an
/// EDNS OPT, RFC 6891) are ignored; answer and authority counts must be 0.
pub fn parse(packet: &[u8]) -> Parsed {
    if packet.len() < HEADER {
        return Parsed::Drop;
    }
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let flags = u16::from_be_bytes([packet[2], packet[3]]);
    if flags & 0x8000 != 0 {
        return Parsed::Drop; // QR: a response, not a query
    }
    let opcode = ((flags >> 11) & 0xf) as u8;
    let rd = flags & 0x0100 != 0;
    let refuse = |code: Rcode, question: &[u8]| Parsed::Refuse(reply(id, opcode, rd, code, question, None));
    if opcode != 0 {
        return refuse(Rcode::NotImp, &[]);
    }
    let (qd, an, ns) = (be16(packet, 4).unwrap_or(0), be16(packet, 6).unwrap_or(0), be16(packet, 8).unwrap_or(0));
    if qd != 1 || an != 0 || ns != 0 {
        return refuse(Rcode::FormErr, &[]);
    }
    // The name: labels until the zero octet; a pointer (0b11 prefix) or the
    // reserved 0b01 / 0b10 prefixes are refused (a question has nothing
    // before it to point at).
    let mut at = HEADER;
    let mut name = String::new();
    let mut clean = true;
    loop {
        let Some(&len) = packet.get(at) else { return refuse(Rcode::FormErr, &[]) };
        at += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return refuse(Rcode::FormErr, &[]);
        }
        let Some(label) = packet.get(at..at + len as usize) else { return refuse(Rcode::FormErr, &[]) };
        at += len as usize;
        if !name.is_empty() {
            name.push('.');
        }
        for &c in label {
            if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' {
                name.push(c.to_ascii_lowercase() as char);
            } else {
                clean = false;
            }
        }
        if at - HEADER > 255 {
            return refuse(Rcode::FormErr, &[]);
        }
    }
    let (Some(qtype), Some(qclass)) = (be16(packet, at), be16(packet, at + 2)) else {
        return refuse(Rcode::FormErr, &[]);
    };
    let question = packet[HEADER..at + 4].to_vec();
    if !clean || name.len() > MAX_NAME {
        return refuse(Rcode::NxDomain, &question);
    }
    Parsed::Query(Query { id, opcode, rd, name, qtype, qclass, question })
}

/// What the responder decided for a [`Query`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// `NOERROR` with one `A` record (TTL [`ANSWER_TTL`]).
    A(Ipv4Addr),
    /// `NOERROR`, no records (another type, or class).
    NoData,
    /// `NXDOMAIN`.
    NxDomain,
    /// `SERVFAIL` (the host could not be asked).
    ServFail,
}

/// Whether a query needs the host's verdict: a question of class IN for
/// a non-empty name (any type). Others get [`Answer::NoData`] at once.
pub fn needs_resolve(q: &Query) -> bool {
    q.qclass == CLASS_IN && !q.name.is_empty()
}

/// The answer to `q` once the host said whether its name is `allowed`:
/// `NXDOMAIN` when not; else `A` with `addr()` (called only then) for an
/// `A` question, no records for any other type.
pub fn verdict(q: &Query, allowed: bool, addr: impl FnOnce() -> Ipv4Addr) -> Answer {
    match (allowed, q.qtype) {
        (false, _) => Answer::NxDomain,
        (true, TYPE_A) => Answer::A(addr()),
        (true, _) => Answer::NoData,
    }
}

/// The response datagram for `q`: header (QR, AA, RA set; RD copied;
/// QDCOUNT 1), the question as asked, and for [`Answer::A`] one record
/// whose name is a pointer to the question (§4.1.4).
pub fn respond(q: &Query, answer: Answer) -> Vec<u8> {
    match answer {
        Answer::A(addr) => reply(q.id, q.opcode, q.rd, Rcode::NoError, &q.question, Some(addr)),
        Answer::NoData => reply(q.id, q.opcode, q.rd, Rcode::NoError, &q.question, None),
        Answer::NxDomain => reply(q.id, q.opcode, q.rd, Rcode::NxDomain, &q.question, None),
        Answer::ServFail => reply(q.id, q.opcode, q.rd, Rcode::ServFail, &q.question, None),
    }
}

fn reply(id: u16, opcode: u8, rd: bool, rcode: Rcode, question: &[u8], a: Option<Ipv4Addr>) -> Vec<u8> {
    let mut flags: u16 = 0x8000 | (u16::from(opcode & 0xf) << 11) | 0x0400 | 0x0080 | rcode as u16;
    if rd {
        flags |= 0x0100;
    }
    let mut out = Vec::with_capacity(HEADER + question.len() + 16);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&u16::from(!question.is_empty()).to_be_bytes());
    out.extend_from_slice(&u16::from(a.is_some()).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    if let Some(addr) = a {
        out.extend_from_slice(&[0xc0, HEADER as u8]); // pointer to the question's name
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ANSWER_TTL.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&addr.octets());
    }
    out
}

/// The two-way table of fake addresses: name -> address for answers,
/// address -> name when the guest connects. Same name, same address while
/// the name is held; at most `capacity` names, the least recently used
/// (answered or connected to) is forgotten first and its address reused.
/// Addresses are [`FAKE_NET`] + 1 .. + `capacity` (at most the /15's
/// 131070 host addresses).
pub struct FakeAddrs {
    capacity: u32,
    by_name: HashMap<String, (u32, u64)>,
    by_index: HashMap<u32, String>,
    lru: BTreeMap<u64, u32>,
    clock: u64,
    next: u32,
}

impl FakeAddrs {
    /// An empty table for at most `capacity` names (clamped to 1 ..= 131070).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, (1usize << (32 - FAKE_PREFIX)) - 2) as u32;
        Self { capacity, by_name: HashMap::new(), by_index: HashMap::new(), lru: BTreeMap::new(), clock: 0, next: 1 }
    }

    /// Names held now.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether no name is held.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    fn addr(index: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(FAKE_NET) + index)
    }

    fn touch(&mut self, name: &str) {
        self.clock += 1;
        if let Some((index, stamp)) = self.by_name.get_mut(name) {
            self.lru.remove(stamp);
            *stamp = self.clock;
            self.lru.insert(self.clock, *index);
        }
    }

    /// The address for `name`, allocating one (and forgetting the least
    /// recently used name when full).
    pub fn assign(&mut self, name: &str) -> Ipv4Addr {
        if let Some(&(index, _)) = self.by_name.get(name) {
            self.touch(name);
            return Self::addr(index);
        }
        let index = if self.next <= self.capacity {
            self.next += 1;
            self.next - 1
        } else {
            // Full: reuse the least recently used name's address.
            let (_, index) = self.lru.pop_first().expect("a full table has entries");
            if let Some(old) = self.by_index.remove(&index) {
                self.by_name.remove(&old);
            }
            index
        };
        self.clock += 1;
        self.by_name.insert(name.to_string(), (index, self.clock));
        self.by_index.insert(index, name.to_string());
        self.lru.insert(self.clock, index);
        Self::addr(index)
    }

    /// The name `addr` stands for, if it is a fake address held now
    /// (counts as a use).
    pub fn name_of(&mut self, addr: Ipv4Addr) -> Option<String> {
        let index = u32::from(addr).checked_sub(u32::from(FAKE_NET))?;
        let name = self.by_index.get(&index)?.clone();
        self.touch(&name);
        Some(name)
    }
}

/// Whether `addr` is in [`FAKE_NET`]/[`FAKE_PREFIX`].
pub fn is_fake(addr: Ipv4Addr) -> bool {
    u32::from(addr) >> (32 - FAKE_PREFIX) == u32::from(FAKE_NET) >> (32 - FAKE_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query as a stub resolver sends it: RD set, one question, optionally
    /// an EDNS OPT record.
    fn query(id: u16, name: &str, qtype: u16, edns: bool) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&0x0100u16.to_be_bytes());
        p.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(edns)]);
        for label in name.split('.').filter(|l| !l.is_empty()) {
            p.push(label.len() as u8);
            p.extend_from_slice(label.as_bytes());
        }
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&CLASS_IN.to_be_bytes());
        if edns {
            p.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        }
        p
    }

    fn rcode(r: &[u8]) -> u8 {
        r[3] & 0xf
    }

    #[test]
    fn a_query_parses_lower_cased_and_answers_with_a_pointer_record() {
        let p = query(0xbeef, "API.Test.", TYPE_A, true);
        let Parsed::Query(q) = parse(&p) else { panic!("not a query: {:?}", parse(&p)) };
        assert_eq!((q.id, q.name.as_str(), q.qtype, q.qclass, q.rd), (0xbeef, "api.test", TYPE_A, CLASS_IN, true));
        assert!(needs_resolve(&q));
        let r = respond(&q, Answer::A(Ipv4Addr::new(198, 18, 0, 7)));
        assert_eq!(&r[..2], &[0xbe, 0xef]);
        assert_eq!(r[2] & 0x80, 0x80, "QR");
        assert_eq!(r[2] & 0x01, 0x01, "RD copied");
        assert_eq!(rcode(&r), 0);
        assert_eq!(&r[4..12], &[0, 1, 0, 1, 0, 0, 0, 0]);
        // The question is echoed as asked (case preserved), then the record.
        let qlen = q.question.len();
        assert_eq!(&r[12..12 + qlen], &p[12..12 + qlen]);
        let rr = &r[12 + qlen..];
        assert_eq!(rr, &[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 198, 18, 0, 7]);
    }

    #[test]
    fn denied_aaaa_and_unclean_names() {
        let Parsed::Query(q) = parse(&query(1, "evil.example", TYPE_A, false)) else { panic!() };
        let r = respond(&q, Answer::NxDomain);
        assert_eq!((rcode(&r), &r[6..8]), (3, &[0u8, 0][..]));
        let Parsed::Query(q) = parse(&query(2, "api.test", TYPE_AAAA, false)) else { panic!() };
        assert!(needs_resolve(&q), "AAAA asks the host too, so A and AAAA agree");
        assert_eq!(verdict(&q, false, || unreachable!()), Answer::NxDomain);
        assert_eq!(verdict(&q, true, || unreachable!()), Answer::NoData, "no address used up for AAAA");
        let r = respond(&q, Answer::NoData);
        assert_eq!((rcode(&r), &r[4..8]), (0, &[0u8, 1, 0, 0][..]));
        // A label with a byte the host protocol does not carry: NXDOMAIN, no host call.
        let mut p = query(3, "a.test", TYPE_A, false);
        p[13] = b'\n';
        let Parsed::Refuse(r) = parse(&p) else { panic!("{:?}", parse(&p)) };
        assert_eq!((&r[..2], rcode(&r)), (&[0u8, 3][..], 3));
    }

    #[test]
    fn malformed_queries_get_formerr_or_nothing() {
        assert_eq!(parse(&[1, 2, 3]), Parsed::Drop);
        let mut resp = query(4, "a.test", TYPE_A, false);
        resp[2] |= 0x80;
        assert_eq!(parse(&resp), Parsed::Drop, "responses are not answered");
        let good = query(5, "a.test", TYPE_A, false);
        for bad in [
            good[..good.len() - 1].to_vec(), // cut in QCLASS
            good[..14].to_vec(),             // cut in a label
            {
                let mut p = good.clone();
                p[5] = 2; // QDCOUNT 2
                p
            },
            {
                let mut p = good.clone();
                p[12] = 0xc0; // a compression pointer in the question
                p
            },
        ] {
            let Parsed::Refuse(r) = parse(&bad) else { panic!("{bad:?} -> {:?}", parse(&bad)) };
            assert_eq!((&r[..2], rcode(&r)), (&[0u8, 5][..], 1), "{bad:?}");
        }
        let mut p = good.clone();
        p[2] |= 2 << 3; // opcode STATUS
        let Parsed::Refuse(r) = parse(&p) else { panic!() };
        assert_eq!(rcode(&r), 4);
        // A name over 255 octets on the wire.
        let long = vec!["a".repeat(63); 5].join(".");
        let Parsed::Refuse(r) = parse(&query(6, &long, TYPE_A, false)) else { panic!() };
        assert_eq!(rcode(&r), 1);
    }

    /// xorshift64*: reproducible noise without a dependency.
    fn noise(seed: &mut u64) -> u64 {
        *seed ^= *seed >> 12;
        *seed ^= *seed << 25;
        *seed ^= *seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    #[test]
    fn random_and_mutated_datagrams_never_panic_and_replies_are_well_formed() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let base = query(7, "www.api.test", TYPE_A, true);
        for round in 0..20_000 {
            let p: Vec<u8> = if round % 2 == 0 {
                let len = (noise(&mut seed) % 600) as usize;
                (0..len).map(|_| noise(&mut seed) as u8).collect()
            } else {
                let mut p = base.clone();
                for _ in 0..1 + noise(&mut seed) % 4 {
                    let i = (noise(&mut seed) as usize) % p.len();
                    p[i] = noise(&mut seed) as u8;
                }
                p.truncate(1 + (noise(&mut seed) as usize) % (p.len() + 4));
                p
            };
            match parse(&p) {
                Parsed::Drop => {}
                Parsed::Refuse(r) => {
                    assert_eq!(&r[..2], &p[..2], "id echoed");
                    assert!(r[2] & 0x80 != 0 && rcode(&r) != 0);
                }
                Parsed::Query(q) => {
                    assert!(q.name.len() <= MAX_NAME);
                    assert!(q
                        .name
                        .bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.')));
                    let r = respond(&q, Answer::A(Ipv4Addr::new(198, 18, 0, 1)));
                    assert_eq!(r.len(), 12 + q.question.len() + 16);
                }
            }
        }
    }

    #[test]
    fn fake_addresses_are_stable_reversible_and_bounded() {
        let mut t = FakeAddrs::new(3);
        let a = t.assign("a.test");
        assert!(is_fake(a) && a == Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(t.assign("a.test"), a, "same name, same address");
        let b = t.assign("b.test");
        let c = t.assign("c.test");
        assert_eq!(t.len(), 3);
        assert_eq!(t.name_of(b).as_deref(), Some("b.test"));
        assert_eq!(t.name_of(Ipv4Addr::new(198, 18, 0, 200)), None, "never handed out");
        assert_eq!(t.name_of(Ipv4Addr::new(10, 0, 0, 1)), None, "not a fake address");
        // Full: a.test is the least recently used (b was connected to, c
        // answered after a), so d.test takes its address.
        let d = t.assign("d.test");
        assert_eq!((d, t.len()), (a, 3));
        assert_eq!(t.name_of(a).as_deref(), Some("d.test"));
        assert_eq!(t.name_of(c).as_deref(), Some("c.test"));
        // a.test comes back with the next least recently used address (b's).
        assert_eq!(t.assign("a.test"), b);
        assert_eq!(t.name_of(b).as_deref(), Some("a.test"));
        assert!(is_fake(Ipv4Addr::new(198, 19, 255, 255)) && !is_fake(Ipv4Addr::new(198, 20, 0, 0)));
        // The whole /15 is the ceiling.
        let mut big = FakeAddrs::new(usize::MAX);
        assert_eq!(big.capacity, 131_070);
        assert!(is_fake(FakeAddrs::addr(big.capacity)));
        assert!(big.is_empty() && big.name_of(FAKE_NET).is_none());
    }
}
