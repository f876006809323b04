//! NF4 against bitsandbytes' own numbers: `tools/nf4_fixture.py` ran bitsandbytes 0.50.2 on CPU
//! (`quantize_4bit(W, blocksize=64, quant_type="nf4")`, with and without `compress_statistics`) on two
//! matrices that this test rebuilds from the same formula, and stored its outputs under
//! `tests/fixtures/quant/` (raw little-endian arrays, described in the script).

use std::path::PathBuf;

use dpo_engine::quant::double_quant::DYNAMIC_MAP;
use dpo_engine::quant::{DoubleQuant, Matrix, Nf4, Scales, Storage, BLOCK, NF4_CODE};

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quant").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f32s(name: &str) -> Vec<f32> {
    fixture(name).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// The script's SplitMix64 draws: `((z >> 40) / 2^24) * 2 - 1`, exact in f32.
fn splitmix_uniform(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// The script's `test_matrix`: rows scaled by powers of two, zero rows, and rows of exact midpoint ties.
fn test_matrix(seed: u64, rows: usize, cols: usize) -> Vec<f32> {
    let mut w = splitmix_uniform(seed, rows * cols);
    let mids: Vec<f32> = NF4_CODE.windows(2).map(|p| (p[0] + p[1]) / 2.0).collect();
    for (r, row) in w.chunks_exact_mut(cols).enumerate() {
        let scale = 2f32.powi(r as i32 % 5 - 2);
        row.iter_mut().for_each(|v| *v *= scale);
        if r % 17 == 3 {
            row.fill(0.0);
        }
        if r % 17 == 5 {
            row.iter_mut().enumerate().for_each(|(c, v)| *v = mids[c % mids.len()]);
            row[0] = 1.0;
        }
    }
    w
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn code_book_and_dynamic_map_are_bitsandbytes_own() {
    assert_eq!(bits(&NF4_CODE), bits(&f32s("nf4_code.f32")));
    assert_eq!(bits(&DYNAMIC_MAP), bits(&f32s("dynamic_map.f32")));
}

#[test]
fn nf4_quantisation_is_bit_exact() {
    for (name, seed, rows, cols) in [("big", 11, 136, 128), ("small", 12, 3, 37)] {
        let w = test_matrix(seed, rows, cols);
        let q = Nf4::quantize(&w, false).unwrap();
        assert_eq!(q.packed(), fixture(&format!("{name}.packed.u8")), "{name}: packed nibbles");
        let Scales::F32(absmax) = q.scales() else { panic!("f32 scales") };
        assert_eq!(bits(absmax), bits(&f32s(&format!("{name}.absmax.f32"))), "{name}: absmax");
    }
}

#[test]
fn nf4_dequantisation_is_bit_exact() {
    // bitsandbytes' own arrays, dequantised here, against its dequantize_4bit.
    let (rows, cols) = (3, 37);
    let packed = fixture("small.packed.u8");
    let nf4 = Nf4::from_parts(rows * cols, packed, Scales::F32(f32s("small.absmax.f32"))).unwrap();
    let m = Matrix::from_nf4(nf4, rows, cols).unwrap();
    assert_eq!(bits(&m.to_f32()), bits(&f32s("small.dq.f32")));
}

#[test]
fn double_quantisation_is_bit_exact() {
    let w = test_matrix(11, 136, 128);
    let absmax = f32s("big.absmax.f32");
    let offset = f32s("big.nested.offset.f32")[0];
    // The 8-bit codes and second-level scales, given bitsandbytes' offset (its f32 mean).
    let dq = DoubleQuant::quantize_with_offset(&absmax, offset);
    assert_eq!(dq.codes(), fixture("big.nested.q.u8"));
    assert_eq!(bits(dq.scales()), bits(&f32s("big.nested.scale.f32")));
    // The absmax values dequantize_4bit reconstructs from them.
    let rebuilt: Vec<f32> = (0..dq.len()).map(|b| dq.get(b)).collect();
    assert_eq!(bits(&rebuilt), bits(&f32s("big.nested.absmax.f32")));
    // Quantising the matrix end to end: the offset is an f64 mean rounded once, which may differ from
    // torch's f32 mean in the last bit; on this matrix the two agree and so does everything else.
    let q = Nf4::quantize(&w, true).unwrap();
    let Scales::Double(ours) = q.scales() else { panic!("double-quantised scales") };
    assert!((ours.offset() - offset).abs() <= offset * f32::EPSILON, "offset {} vs {offset}", ours.offset());
    assert_eq!(ours, &dq);
    assert_eq!(q.packed(), fixture("big.packed.u8"));
    assert_eq!(q.len(), 136 * 128);
    assert_eq!(q.scales().len(), 136 * 128 / BLOCK);
    let m = Matrix::new(w, 136, 128, Storage::Nf4 { double_quant: true }).unwrap();
    assert_eq!(m.bytes(), 136 * 128 / 2 + 272 + 2 * 4 + 4);
}
