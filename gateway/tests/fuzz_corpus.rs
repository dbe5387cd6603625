//! The gateway fuzz harness (`gateway/fuzz/harness.rs`) on stable: replays
//! the checked-in seed corpus (`gateway/fuzz/corpus/preamble_frames/`) and
//! deterministic pseudo-random mutations of it through a real gateway on a
//! real socket, so `cargo test` exercises what `cargo fuzz run
//! preamble_frames` does.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::PathBuf;

fn seeds() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/preamble_frames");
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn seed_corpus_is_handled_within_bounds() {
    let seeds = seeds();
    assert!(seeds.len() >= 6, "the seed corpus has {} files", seeds.len());
    capvisor_rpc::conn::run_local(async {
        let gw = harness::Gw::start();
        let mut answered = 0;
        for (name, input) in &seeds {
            let out = harness::feed(&gw, input).await.unwrap_or_else(|e| panic!("{name}: {e}"));
            // Bad preambles and oversized frames get no byte back: the
            // gateway hangs up without a word.
            if name.starts_with("bad-") {
                assert_eq!(out.bytes_back, 0, "{name}: the gateway answered a bad connection");
            }
            if name.starts_with("rpc-call-") && out.bytes_back > 0 {
                answered += 1;
            }
            harness::check(&gw, input).await;
        }
        assert!(answered > 0, "no well-formed call in the corpus got an answer: the seeds do not reach capnp-rpc");
        assert!(!harness::panicked());
    });
}

/// xorshift64* mutations of the seeds (bit flips, cut, splice, length
/// fields set to extremes), a fixed seed so failures reproduce.
#[test]
fn mutated_seeds_are_handled_within_bounds() {
    let seeds = seeds();
    let mut x: u64 = 0x5eed_cafe_f00d_0001;
    let mut next = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    capvisor_rpc::conn::run_local(async {
        let gw = harness::Gw::start();
        for _ in 0..300 {
            let (_, base) = &seeds[next() as usize % seeds.len()];
            let mut m = base.clone();
            match next() % 4 {
                0 if !m.is_empty() => {
                    for _ in 0..1 + next() % 4 {
                        let i = next() as usize % m.len();
                        m[i] ^= 1 << (next() % 8);
                    }
                }
                1 => m.truncate(next() as usize % (m.len() + 1)),
                2 => {
                    let (_, other) = &seeds[next() as usize % seeds.len()];
                    let cut = next() as usize % (other.len() + 1);
                    m.extend_from_slice(&other[cut..]);
                }
                _ if m.len() >= 16 => {
                    // A length field after the preamble: segment count or size.
                    let at = 8 + (next() as usize % ((m.len() - 12) / 4)) * 4;
                    let v = [0u32, 1, 511, 512, u32::MAX, 1 << 21, (1 << 21) + 1][next() as usize % 7];
                    m[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
                _ => m.push(next() as u8),
            }
            harness::check(&gw, &m).await;
        }
        assert!(!harness::panicked());
    });
}
