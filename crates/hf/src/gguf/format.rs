//! The GGUF v3 container, as llama.cpp's `ggml/src/gguf.cpp` reads it. Little-endian throughout:
//!
//! ```text
//! "GGUF"  u32 version (3)  u64 tensor_count  u64 kv_count
//! kv_count x  { string key, u32 value_type, value }
//! tensor_count x { string name, u32 n_dims, u64 ne[n_dims] (innermost first), u32 ggml_type, u64 offset }
//! zero padding to `general.alignment` (32 when absent)
//! tensor data: each tensor at data_start + offset, offsets multiples of the alignment, zero padded
//! ```
//!
//! A string is `u64 length, bytes` (UTF-8, no terminator). An array value is `u32 element_type, u64
//! count, elements`. A tensor's `ne` is its shape reversed: a PyTorch `[rows, cols]` weight is `ne =
//! [cols, rows]`. No crate is used for this: the ones that write GGUF (`ggus`, `gguf-rs-lib`, candle's
//! `gguf_file`) are either large dependencies for ~150 lines of framing or young single-author crates;
//! the reader beside it ([`super::read`]) checks what this writes.

use std::io::{self, Write};

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
/// `general.alignment`'s default; this writer always uses it.
pub const ALIGNMENT: u64 = 32;

/// Metadata value types (`gguf_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    pub fn from_u32(v: u32) -> Option<Self> {
        use ValueType::*;
        [U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64].into_iter().find(|t| *t as u32 == v)
    }
}

/// One metadata value. Arrays hold elements of one scalar or string type (`elem`), kept even when empty.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array { elem: ValueType, items: Vec<Value> },
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn ty(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::Str(_) => ValueType::String,
            Value::Array { .. } => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    pub fn strings(items: impl IntoIterator<Item = String>) -> Self {
        Value::Array { elem: ValueType::String, items: items.into_iter().map(Value::Str).collect() }
    }

    pub fn i32s(items: impl IntoIterator<Item = i32>) -> Self {
        Value::Array { elem: ValueType::I32, items: items.into_iter().map(Value::I32).collect() }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            _ => None,
        }
    }
}

/// Tensor element types (`ggml_type`) this crate writes and reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    /// Blocks of 32 values: an f16 scale `d`, then 32 `i8`s; value = `d * q`.
    Q8_0,
    Bf16,
}

impl GgmlType {
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
            GgmlType::Bf16 => 30,
        }
    }

    pub fn from_id(id: u32) -> Option<Self> {
        [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Bf16].into_iter().find(|t| t.id() == id)
    }

    /// Values per block and bytes per block.
    pub fn block(self) -> (u64, u64) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::Bf16 => (1, 2),
            GgmlType::Q8_0 => (32, 34),
        }
    }

    /// Bytes of `n` values; `None` when `n` is not a whole number of blocks.
    pub fn bytes(self, n: u64) -> Option<u64> {
        let (per, size) = self.block();
        n.is_multiple_of(per).then(|| n / per * size)
    }
}

/// A tensor to write: its name, `ne` (innermost first) and type; its encoded bytes are asked for when
/// the file reaches them ([`write`]).
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl Tensor {
    /// Bytes of its data; `None` where its dims are not a whole number of its type's blocks.
    pub fn bytes(&self) -> Option<u64> {
        self.ty.bytes(self.dims.iter().product())
    }
}

fn write_str(w: &mut dyn Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut dyn Write, v: &Value) -> io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes()),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::Str(s) => write_str(w, s),
        Value::Array { elem, items } => {
            w.write_all(&(*elem as u32).to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|item| write_value(w, item))
        }
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
    }
}

fn padding(pos: u64) -> u64 {
    (ALIGNMENT - pos % ALIGNMENT) % ALIGNMENT
}

/// Checks what the format cannot represent (mixed arrays, nested arrays, a tensor whose shape is not a
/// whole number of its type's blocks); `Err` names the key or tensor. Called by [`write`].
pub fn check(metadata: &[(String, Value)], tensors: &[Tensor]) -> Result<(), String> {
    for (key, v) in metadata {
        if let Value::Array { elem, items } = v {
            if *elem == ValueType::Array || items.iter().any(|i| i.ty() != *elem) {
                return Err(format!("metadata `{key}`: array elements must all be of its one scalar or string type"));
            }
        }
    }
    for t in tensors {
        if t.dims.is_empty() || t.dims.len() > 4 || t.bytes().is_none() {
            return Err(format!(
                "tensor `{}`: {:?} does not fit ne {:?} (1 to 4 dims, whole blocks)",
                t.name, t.ty, t.dims
            ));
        }
    }
    Ok(())
}

/// Writes a complete GGUF v3 file (see the module doc). `metadata` is written in the order given; it
/// must not hold `general.alignment` (the default, 32, is used). Each tensor's encoded bytes are asked of
/// `data(i, w)` in order, once the header is written, to write into `w` in pieces of any size, so a
/// caller can make them a block at a time; bytes that do not match the tensor's shape and type are
/// refused.
pub fn write(
    w: &mut dyn Write,
    metadata: &[(String, Value)],
    tensors: &[Tensor],
    mut data: impl FnMut(usize, &mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    check(metadata, tensors).map_err(|m| io::Error::new(io::ErrorKind::InvalidInput, m))?;
    let sizes: Vec<u64> = tensors.iter().map(|t| t.bytes().unwrap_or(0)).collect();
    // Header and tables go through a buffer so their length is known for the padding before the data.
    let mut head = Vec::new();
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, v) in metadata {
        write_str(&mut head, key)?;
        head.extend_from_slice(&(v.ty() as u32).to_le_bytes());
        write_value(&mut head, v)?;
    }
    let mut offset = 0u64;
    for (t, size) in tensors.iter().zip(&sizes) {
        write_str(&mut head, &t.name)?;
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&t.ty.id().to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset += size + padding(*size);
    }
    let pad = padding(head.len() as u64) as usize;
    head.resize(head.len() + pad, 0);
    w.write_all(&head)?;
    for (i, (t, size)) in tensors.iter().zip(&sizes).enumerate() {
        let mut counted = Counted { w: &mut *w, bytes: 0 };
        data(i, &mut counted)?;
        if counted.bytes != *size {
            let msg = format!("tensor `{}`: {} bytes of {:?} do not fit ne {:?}", t.name, counted.bytes, t.ty, t.dims);
            return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
        }
        w.write_all(&vec![0u8; padding(*size) as usize])?;
    }
    Ok(())
}

/// A writer that counts the bytes written through it.
struct Counted<'w> {
    w: &'w mut dyn Write,
    bytes: u64,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.w.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}
