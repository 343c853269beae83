//! Key encoding of the store (see the table in the parent module).

use shared::case::CaseId;

/// The key prefixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Prefix {
    /// `i` machine 0 id → seq
    Idem = b'i',
    /// `p` machine → open window
    Pending = b'p',
    /// `c` seq → case
    Case = b'c',
    /// `k` id → case seq
    CaseId = b'k',
    /// `o` seq → case id
    Outbox = b'o',
    /// `m` name → meta
    Meta = b'm',
    /// `v` case id → the cloud's verdict (JSON)
    Verdict = b'v',
}

impl Prefix {
    /// The prefix of a key.
    pub fn of(key: &[u8]) -> Option<Prefix> {
        Some(match key.first()? {
            b'i' => Prefix::Idem,
            b'p' => Prefix::Pending,
            b'c' => Prefix::Case,
            b'k' => Prefix::CaseId,
            b'o' => Prefix::Outbox,
            b'm' => Prefix::Meta,
            b'v' => Prefix::Verdict,
            _ => return None,
        })
    }
}

fn with_seq(p: Prefix, seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = p as u8;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Key of the cloud's verdict on a case.
pub fn verdict(id: &CaseId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = Prefix::Verdict as u8;
    k[1..].copy_from_slice(&id.0);
    k
}

/// Key of a case.
pub fn case(seq: u64) -> [u8; 9] {
    with_seq(Prefix::Case, seq)
}

/// Key of an outbox entry.
pub fn outbox(seq: u64) -> [u8; 9] {
    with_seq(Prefix::Outbox, seq)
}

/// Key of the case-id index.
pub fn case_id(id: &CaseId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = Prefix::CaseId as u8;
    k[1..].copy_from_slice(&id.0);
    k
}

/// Key of the idempotency index.
pub fn idem(machine: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + machine.len() + id.len());
    k.push(Prefix::Idem as u8);
    k.extend_from_slice(machine.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Key of a machine's open window.
pub fn pending(machine: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + machine.len());
    k.push(Prefix::Pending as u8);
    k.extend_from_slice(machine.as_bytes());
    k
}

/// Key of a meta value.
pub fn meta(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(Prefix::Meta as u8);
    k.extend_from_slice(name.as_bytes());
    k
}

/// The sequence number of a `c` or `o` key.
pub fn seq_of(key: &[u8]) -> u64 {
    be_u64(key.get(1..).unwrap_or(&[]))
}

/// A big-endian u64 (zero-padded if short).
pub fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    let n = b.len().min(8);
    a[..n].copy_from_slice(&b[..n]);
    u64::from_be_bytes(a)
}
