//! f32 values ↔ the bytes of a GGUF tensor type (ggml's reference encodings).
//!
//! Q8_0 (ggml's `quantize_row_q8_0_ref`): blocks of 32 values; `d = max|x| / 127` stored as f16, then the
//! 32 values `round(x / d)` as `i8` (0 when the block is all zero). Decoding is `d * q`, so each value is
//! within `d / 2` (plus f16 rounding of `d`) of the original.

use half::{bf16, f16};

use super::format::GgmlType;

pub const Q8_0_BLOCK: usize = 32;

/// Encodes `x` as `ty`; for Q8_0 `x.len()` must be a multiple of 32 (the caller checks the row length).
pub fn encode(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => x.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
        GgmlType::Bf16 => x.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
        GgmlType::Q8_0 => {
            assert_eq!(x.len() % Q8_0_BLOCK, 0, "Q8_0 needs whole blocks of 32");
            let mut out = Vec::with_capacity(x.len() / Q8_0_BLOCK * 34);
            for block in x.chunks_exact(Q8_0_BLOCK) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
            }
            out
        }
    }
}

/// Decodes bytes of `ty` back to f32 (`bytes.len()` a whole number of blocks).
pub fn decode(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    match ty {
        GgmlType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        GgmlType::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        GgmlType::Bf16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        GgmlType::Q8_0 => bytes
            .chunks_exact(34)
            .flat_map(|b| {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                b[2..].iter().map(move |q| d * f32::from(*q as i8))
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_round_trip_is_within_half_a_step() {
        let x: Vec<f32> = (0..96).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let bytes = encode(GgmlType::Q8_0, &x);
        assert_eq!(bytes.len(), 3 * 34);
        let y = decode(GgmlType::Q8_0, &bytes);
        for (bx, by) in x.chunks(32).zip(y.chunks(32)) {
            let d = bx.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            let d16 = f16::from_f32(d).to_f32();
            for (a, b) in bx.iter().zip(by) {
                // Half a step of the stored scale plus the scale's own f16 rounding over 127 steps.
                assert!((a - b).abs() <= d16 / 2.0 + 127.0 * (d - d16).abs() + 1e-7, "{a} vs {b} (d {d})");
            }
        }
        // The largest magnitude of a block maps to +-127 exactly.
        let first_max = x[..32].iter().fold(0f32, |m, v| m.max(v.abs()));
        let q: Vec<i8> = bytes[2..34].iter().map(|b| *b as i8).collect();
        let i = x[..32].iter().position(|v| v.abs() == first_max).unwrap();
        assert_eq!(q[i].unsigned_abs(), 127);
    }

    #[test]
    fn zero_block_and_half_types() {
        let y = decode(GgmlType::Q8_0, &encode(GgmlType::Q8_0, &[0.0; 32]));
        assert!(y.iter().all(|v| *v == 0.0));
        let x = [1.0f32, -2.5, 0.333, 65504.0];
        assert_eq!(decode(GgmlType::F32, &encode(GgmlType::F32, &x)), x);
        let h = decode(GgmlType::F16, &encode(GgmlType::F16, &x));
        assert_eq!(h[..2], x[..2]);
        assert!((h[2] - 0.333).abs() < 1e-3);
        let b = decode(GgmlType::Bf16, &encode(GgmlType::Bf16, &x));
        assert!((b[2] - 0.333).abs() < 2e-3 && b[0] == 1.0);
    }
}
