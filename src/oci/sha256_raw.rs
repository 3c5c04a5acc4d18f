//! SHA-256 whose state can be saved and restored at block boundaries, on the same compression
//! function (and CPU extensions) as `sha2::Sha256`. An upload session kept in object storage
//! saves the state after each part, so a session resumed elsewhere hashes only its tail
//! instead of reading gigabytes back.

use serde::{Deserialize, Serialize};
use sha2::digest::generic_array::GenericArray;

const IV: [u32; 8] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

/// The state at a block boundary: what a session stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Midstate {
    pub h: [u32; 8],
    /// Bytes hashed so far (a multiple of 64).
    pub len: u64,
}

impl Default for Midstate {
    fn default() -> Self {
        Midstate { h: IV, len: 0 }
    }
}

#[derive(Clone)]
pub struct Sha256Raw {
    h: [u32; 8],
    len: u64,
    buf: Vec<u8>,
}

impl Sha256Raw {
    pub fn from_midstate(m: Midstate) -> Sha256Raw {
        assert!(m.len.is_multiple_of(64), "a midstate ends on a block boundary");
        Sha256Raw { h: m.h, len: m.len, buf: Vec::with_capacity(64) }
    }

    /// The state, if everything hashed so far ends on a block boundary.
    pub fn midstate(&self) -> Option<Midstate> {
        self.buf.is_empty().then_some(Midstate { h: self.h, len: self.len })
    }

    fn blocks(&mut self, data: &[u8]) {
        for b in data.chunks_exact(64) {
            sha2::compress256(&mut self.h, std::slice::from_ref(GenericArray::from_slice(b)));
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if !self.buf.is_empty() {
            let take = (64 - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() < 64 {
                return;
            }
            let block = std::mem::take(&mut self.buf);
            self.blocks(&block);
            self.buf = block;
            self.buf.clear();
        }
        let whole = data.len() / 64 * 64;
        self.blocks(&data[..whole]);
        self.buf.extend_from_slice(&data[whole..]);
    }

    pub fn finish(mut self) -> [u8; 32] {
        let bits = self.len.wrapping_mul(8);
        let mut tail = std::mem::take(&mut self.buf);
        tail.push(0x80);
        while tail.len() % 64 != 56 {
            tail.push(0);
        }
        tail.extend_from_slice(&bits.to_be_bytes());
        self.blocks(&tail);
        let mut out = [0u8; 32];
        for (i, w) in self.h.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    #[test]
    fn agrees_with_sha2_across_pieces_and_resumes() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for cut in [0usize, 1, 63, 64, 65, 127, 128, 4096, 9_999, 10_000] {
            let mut h = Sha256Raw::from_midstate(Midstate::default());
            h.update(&data[..cut]);
            for piece in data[cut..].chunks(37) {
                h.update(piece);
            }
            assert_eq!(h.finish().as_slice(), sha2::Sha256::digest(&data).as_slice(), "cut {cut}");
        }
        let mut a = Sha256Raw::from_midstate(Midstate::default());
        a.update(&data[..4096]);
        let m = a.midstate().unwrap();
        let mut b = Sha256Raw::from_midstate(serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap());
        b.update(&data[4096..]);
        assert_eq!(b.finish().as_slice(), sha2::Sha256::digest(&data).as_slice());
        assert!(Sha256Raw::from_midstate(Midstate::default()).finish() == <[u8; 32]>::from(sha2::Sha256::digest(b"")));
    }
}
