//! Tessera's internal protocol, shared by every service.
//!
//! * [`header`]: the fixed 64-byte binary header of every message between a
//!   gateway and a storage daemon (and, later, between storage daemons).
//! * [`map`]: the epoch-numbered cluster map the manager publishes, and the
//!   placement hash that turns (volume, chunk) into a placement group. The
//!   gateway and the manager must agree on it bit for bit, so it lives here.
//! * [`api`]: the JSON bodies of the manager's REST API.
//! * [`iscsi`]: iSCSI access control (ACLs, CHAP) and reservation state as
//!   the manager keeps them.
//!
//! This crate does no I/O: bytes in, values out, values in, bytes out.
#![deny(unsafe_code)]

pub mod api;
pub mod header;
pub mod iscsi;
pub mod map;

pub use header::{Flags, Header, HeaderError, Op, Status};

/// CRC32C (Castagnoli), hardware accelerated where the CPU has it.
/// Used for wire payloads, wire headers and on-disk blocks alike.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Continue a CRC32C over more bytes.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// The reflected CRC32C polynomial.
const CRC32C_POLY: u32 = 0x82f6_3b78;

/// Multiply two polynomials modulo the CRC32C polynomial (bit-reflected
/// representation: bit 31 is x^0).
const fn crc32c_mulmod(a: u32, mut b: u32) -> u32 {
    let mut m: u32 = 1 << 31;
    let mut p = 0;
    while m != 0 {
        if a & m != 0 {
            p ^= b;
        }
        m >>= 1;
        b = if b & 1 != 0 {
            (b >> 1) ^ CRC32C_POLY
        } else {
            b >> 1
        };
    }
    p
}

/// x^(8 * 4096) modulo the polynomial: appending 4 KiB to a message
/// multiplies its CRC register by this.
const X_POW_4K: u32 = {
    let mut k: u32 = 1 << 31;
    let mut i = 0;
    while i < 8 * 4096 {
        k = if k & 1 != 0 {
            (k >> 1) ^ CRC32C_POLY
        } else {
            k >> 1
        };
        i += 1;
    }
    k
};

/// The CRC32C of `a` followed by a 4 KiB block, from the CRC of `a` and the
/// block's own CRC, without reading either. The storage engine keeps every
/// block's CRC, so a block-aligned read's payload CRC costs 32 of these
/// (nanoseconds each) instead of another pass over the data. (The pre- and
/// post-inversion of CRC32C cancel out in this identity.)
pub fn crc32c_append_4k(crc_a: u32, crc_block: u32) -> u32 {
    crc32c_mulmod(X_POW_4K, crc_a) ^ crc_block
}

#[cfg(test)]
mod crc_tests {
    use super::*;

    // Proves combining per-block CRCs gives the CRC of the concatenation,
    // for any prefix length and for runs of blocks, zero blocks included.
    #[test]
    fn append_4k_equals_crc_of_concatenation() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut bytes = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        for prefix in [0usize, 1, 511, 4096, 10_000] {
            let a = bytes(prefix);
            let b = bytes(4096);
            let mut ab = a.clone();
            ab.extend_from_slice(&b);
            assert_eq!(crc32c_append_4k(crc32c(&a), crc32c(&b)), crc32c(&ab));
        }
        let blocks: Vec<Vec<u8>> = (0..32)
            .map(|i| {
                if i % 5 == 0 {
                    vec![0; 4096]
                } else {
                    bytes(4096)
                }
            })
            .collect();
        let mut crc = crc32c(&blocks[0]);
        for b in &blocks[1..] {
            crc = crc32c_append_4k(crc, crc32c(b));
        }
        assert_eq!(crc, crc32c(&blocks.concat()));
    }
}
