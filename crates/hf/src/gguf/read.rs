//! Reading a GGUF file back: header, metadata, tensor table and each tensor's bytes, with every count,
//! length and offset checked against the file (no panics on a truncated or corrupt file). Used by the
//! tests to check what [`super::format::write`] produced, and by `dpo export` to read its output back.

use super::format::{GgmlType, Value, ValueType, ALIGNMENT, MAGIC};

/// A tensor's entry in the table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// From the start of the data section.
    pub offset: u64,
}

/// A parsed file: its metadata in file order, its tensor table, and where the data section starts.
#[derive(Clone, Debug)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub data_start: u64,
}

impl GgufFile {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of tensor `t` in `file` (the whole file this was parsed from).
    pub fn tensor_bytes<'f>(&self, file: &'f [u8], t: &TensorInfo) -> Result<&'f [u8], String> {
        let n: u64 = t.dims.iter().product();
        let len = t.ty.bytes(n).ok_or_else(|| format!("tensor `{}`: ne {:?} is not whole blocks", t.name, t.dims))?;
        let start = self.data_start.checked_add(t.offset).ok_or("offset overflows")?;
        let end = start.checked_add(len).ok_or("length overflows")?;
        if end > file.len() as u64 {
            return Err(format!("tensor `{}`: bytes {start}..{end} past the end of the file ({})", t.name, file.len()));
        }
        Ok(&file[start as usize..end as usize])
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], String> {
        let end = (self.pos as u64).checked_add(n).filter(|&e| e <= self.buf.len() as u64);
        let Some(end) = end else {
            return Err(format!("{what}: {n} bytes at offset {} run past the end of the file", self.pos));
        };
        let s = &self.buf[self.pos..end as usize];
        self.pos = end as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.u64(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what}: not UTF-8"))
    }

    fn value(&mut self, ty: ValueType, what: &str) -> Result<Value, String> {
        Ok(match ty {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.array(what)?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(self.u32(what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::Bool => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{what}: bool byte {b}")),
            },
            ValueType::String => Value::Str(self.string(what)?),
            ValueType::U64 => Value::U64(self.u64(what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Array => {
                let elem = self.u32(what)?;
                let elem = ValueType::from_u32(elem)
                    .filter(|t| *t != ValueType::Array)
                    .ok_or_else(|| format!("{what}: array element type {elem}"))?;
                let n = self.u64(what)?;
                // Every element takes at least one byte: a count past the file's end is corrupt.
                if n > (self.buf.len() - self.pos) as u64 {
                    return Err(format!("{what}: {n} array elements cannot fit in the file"));
                }
                let items = (0..n).map(|_| self.value(elem, what)).collect::<Result<_, _>>()?;
                Value::Array { elem, items }
            }
        })
    }
}

/// Parses the header, metadata and tensor table of `buf` (a whole file); `Err` says what is wrong where.
pub fn parse(buf: &[u8]) -> Result<GgufFile, String> {
    let mut c = Cursor { buf, pos: 0 };
    if c.take(4, "magic")? != MAGIC {
        return Err("not a GGUF file (no `GGUF` magic)".into());
    }
    let version = c.u32("version")?;
    if version != 3 {
        return Err(format!("GGUF version {version}; only version 3 is read"));
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    let mut metadata = Vec::new();
    for i in 0..n_kv {
        let key = c.string(&format!("metadata key {i}"))?;
        let ty = c.u32(&key)?;
        let ty = ValueType::from_u32(ty).ok_or_else(|| format!("metadata `{key}`: value type {ty}"))?;
        let v = c.value(ty, &key)?;
        metadata.push((key, v));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        Some((_, Value::U32(a))) if *a > 0 && a.is_power_of_two() => u64::from(*a),
        Some(_) => return Err("`general.alignment` must be a u32 power of two".into()),
        None => ALIGNMENT,
    };
    let mut tensors = Vec::new();
    for i in 0..n_tensors {
        let name = c.string(&format!("tensor name {i}"))?;
        let n_dims = c.u32(&name)?;
        if !(1..=4).contains(&n_dims) {
            return Err(format!("tensor `{name}`: {n_dims} dimensions"));
        }
        let dims = (0..n_dims).map(|_| c.u64(&name)).collect::<Result<Vec<_>, _>>()?;
        let ty = c.u32(&name)?;
        let ty = GgmlType::from_id(ty).ok_or_else(|| format!("tensor `{name}`: ggml type {ty} is not read here"))?;
        let offset = c.u64(&name)?;
        if offset % alignment != 0 {
            return Err(format!("tensor `{name}`: offset {offset} is not a multiple of {alignment}"));
        }
        tensors.push(TensorInfo { name, dims, ty, offset });
    }
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    Ok(GgufFile { version, metadata, tensors, data_start })
}

#[cfg(test)]
mod tests {
    use super::super::format::{write, Tensor};
    use super::super::quant::encode;
    use super::*;

    fn sample() -> Vec<u8> {
        let md = vec![
            ("general.architecture".to_string(), Value::Str("llama".into())),
            ("a.count".to_string(), Value::U32(7)),
            ("a.eps".to_string(), Value::F32(1e-6)),
            ("a.flag".to_string(), Value::Bool(true)),
            ("a.names".to_string(), Value::strings(["x".to_string(), "Ġy".to_string()])),
            ("a.types".to_string(), Value::i32s([1, 3])),
        ];
        let x: Vec<f32> = (0..64).map(|i| i as f32 / 10.0).collect();
        let tensors = vec![
            Tensor { name: "w".into(), dims: vec![32, 2], ty: GgmlType::Q8_0 },
            Tensor { name: "b".into(), dims: vec![3], ty: GgmlType::F32 },
            Tensor { name: "h".into(), dims: vec![2, 2], ty: GgmlType::F16 },
        ];
        let data =
            [encode(GgmlType::Q8_0, &x), encode(GgmlType::F32, &[1.0, 2.0, 3.0]), encode(GgmlType::F16, &[1.0; 4])];
        let mut buf = Vec::new();
        write(&mut buf, &md, &tensors, |i, w| w.write_all(&data[i])).unwrap();
        buf
    }

    #[test]
    fn what_is_written_reads_back() {
        let buf = sample();
        let f = parse(&buf).unwrap();
        assert_eq!(f.metadata.len(), 6);
        assert_eq!(f.get("a.count"), Some(&Value::U32(7)));
        assert_eq!(f.get("a.names"), Some(&Value::strings(["x".to_string(), "Ġy".to_string()])));
        assert_eq!(f.get("a.flag"), Some(&Value::Bool(true)));
        let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["w", "b", "h"]);
        assert!(f.tensors.iter().all(|t| t.offset.is_multiple_of(ALIGNMENT)) && f.data_start.is_multiple_of(ALIGNMENT));
        let b = f.tensor("b").unwrap();
        assert_eq!(f.tensor_bytes(&buf, b).unwrap(), &encode(GgmlType::F32, &[1.0, 2.0, 3.0])[..]);
        assert_eq!(f.tensor_bytes(&buf, f.tensor("w").unwrap()).unwrap().len(), 2 * 34);
        // The file ends with the last tensor's padded data.
        let h = f.tensor("h").unwrap();
        assert_eq!(buf.len() as u64, f.data_start + h.offset + 32);
    }

    #[test]
    fn every_truncation_and_bad_magic_is_an_error_not_a_panic() {
        let buf = sample();
        let full = parse(&buf).unwrap();
        for cut in 0..buf.len() {
            let part = &buf[..cut];
            if let Ok(f) = parse(part) {
                // Only the data section was cut: a tensor past the end is refused when read, unless only the
                // last tensor's padding is gone.
                let h = f.tensor("h").unwrap();
                let data_end = f.data_start + h.offset + 8;
                assert!(
                    cut as u64 >= data_end || f.tensors.iter().any(|t| f.tensor_bytes(part, t).is_err()),
                    "cut {cut}"
                );
                assert_eq!(f.metadata, full.metadata);
            }
        }
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert!(parse(&bad).unwrap_err().contains("magic"));
        let mut huge = buf;
        // The first key's length: far past the end of the file.
        huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&huge).is_err());
    }
}
