//! TensorBoard event files (`--report-to tensorboard`): each metrics line of a run as scalars under TRL's
//! tag names (`train/loss`, `train/rewards/margins`, ..., `eval/loss`: the `eval_` prefix of a metrics key
//! becomes `eval/`, every other key gets `train/`, as transformers' `TensorBoardCallback` writes them).
//!
//! Format (TensorFlow's TFRecord framing around `tensorflow.Event` protobufs), per record:
//! `u64 length, u32 masked_crc32c(length bytes), data, u32 masked_crc32c(data)`, little-endian; the mask is
//! `((crc >> 15) | (crc << 17)) + 0xa282ead8`. The first event holds `file_version = "brain.Event:2"`;
//! each later one `wall_time` (1, double), `step` (2, int64) and a `Summary` (5) of `Value`s with `tag`
//! (1, string) and `simple_value` (2, float). The three messages are encoded by hand below (a dozen
//! lines) rather than pulling in a protobuf code generator; the CRC is the `crc32c` crate. The one
//! Rust TensorBoard writer on crates.io (`tensorboard-rs`) is unmaintained since 2022 and pulls in
//! protobuf 2 and `image`.
//!
//! A resumed run appends a new file; TensorBoard drops the abandoned steps of the older file itself (it
//! purges a tag's points at or after a step that goes back).

use std::io::Write;
use std::path::{Path, PathBuf};

/// Where metrics go besides `metrics.jsonl` (always written: resuming and `dpo plot` read it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReportTo {
    pub tensorboard: bool,
}

impl ReportTo {
    /// `jsonl`, `tensorboard`, or both comma-separated (`none` is `jsonl` alone).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut r = ReportTo::default();
        for part in s.split(',').map(str::trim) {
            match part {
                "jsonl" | "none" => {}
                "tensorboard" => r.tensorboard = true,
                other => return Err(format!("`{other}` is not a report target (jsonl, tensorboard)")),
            }
        }
        Ok(r)
    }

    pub fn name(&self) -> &'static str {
        if self.tensorboard {
            "jsonl,tensorboard"
        } else {
            "jsonl"
        }
    }
}

/// The subdirectory of a run that holds the event files (TRL's `logging_dir` default is `RUN/runs/...`).
pub const EVENTS_DIR: &str = "runs";

/// A trainer's TensorBoard tag for one of its metrics keys; `None` for keys that are not curves.
pub type TagFn = fn(&str) -> Option<String>;

/// TRL's tag for a metrics key; `None` for keys that are not curves (`step`).
pub fn trl_tag(key: &str) -> Option<String> {
    match key {
        "step" => None,
        k => Some(match k.strip_prefix("eval_") {
            Some(rest) => format!("eval/{rest}"),
            None => format!("train/{k}"),
        }),
    }
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, u64::from(field << 3 | 2));
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// One `Event` with `wall_time`, `step` and either a file version or scalars.
fn event(wall_time: f64, step: i64, file_version: Option<&str>, scalars: &[(String, f32)]) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(0x09); // field 1, 64-bit
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10); // field 2, varint
    varint(&mut e, step as u64);
    if let Some(v) = file_version {
        bytes_field(&mut e, 3, v.as_bytes());
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            bytes_field(&mut v, 1, tag.as_bytes());
            v.push(0x15); // field 2, 32-bit
            v.extend_from_slice(&value.to_le_bytes());
            bytes_field(&mut summary, 1, &v);
        }
        bytes_field(&mut e, 5, &summary);
    }
    e
}

fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc(data).to_le_bytes());
    r
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// An open event file; every write is flushed, so TensorBoard sees a step as soon as it is logged.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
    tags: TagFn,
}

impl EventWriter {
    /// Creates `dir` and a new event file in it (named `events.out.tfevents.<time>.dpo.<pid>`, the
    /// `tfevents` that TensorBoard looks for), starting with the file-version event. `tags` names each
    /// metrics key's curve ([`trl_tag`] for the DPO-family trainers).
    pub fn create(dir: &Path, tags: TagFn) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let t = now();
        let path = dir.join(format!("events.out.tfevents.{}.dpo.{}", t as u64, std::process::id()));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        let mut w = EventWriter { path, file, tags };
        w.write(&event(t, 0, Some("brain.Event:2"), &[]))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: &[u8]) -> std::io::Result<()> {
        self.file.write_all(&record(event))?;
        self.file.flush()
    }

    /// The numbers of one metrics line (a JSON object) at its `step`, under the writer's tags.
    pub fn metrics_line(&mut self, line: &serde_json::Value) -> std::io::Result<()> {
        let Some(obj) = line.as_object() else { return Ok(()) };
        let step = obj.get("step").and_then(serde_json::Value::as_i64).unwrap_or(0);
        let scalars: Vec<(String, f32)> =
            obj.iter().filter_map(|(k, v)| Some(((self.tags)(k)?, v.as_f64()? as f32))).collect();
        if scalars.is_empty() {
            return Ok(());
        }
        self.write(&event(now(), step, None, &scalars))
    }
}

/// One scalar read back from an event file.
#[derive(Clone, Debug, PartialEq)]
pub struct Scalar {
    pub step: i64,
    pub tag: String,
    pub value: f32,
}

/// Reads the scalars of an event file, checking the framing and both CRCs of every record (the file
/// version event carries none). `Err` says which record is bad.
pub fn read_scalars(bytes: &[u8]) -> Result<(Option<String>, Vec<Scalar>), String> {
    let (mut pos, mut version, mut out) = (0usize, None, Vec::new());
    while pos < bytes.len() {
        let head = bytes.get(pos..pos + 12).ok_or(format!("record at {pos}: truncated header"))?;
        let len = u64::from_le_bytes(head[..8].try_into().unwrap());
        if u32::from_le_bytes(head[8..12].try_into().unwrap()) != masked_crc(&head[..8]) {
            return Err(format!("record at {pos}: length CRC mismatch"));
        }
        let end = (pos as u64 + 12).checked_add(len).filter(|e| e + 4 <= bytes.len() as u64);
        let end = end.ok_or(format!("record at {pos}: truncated data"))? as usize;
        let data = &bytes[pos + 12..end];
        if u32::from_le_bytes(bytes[end..end + 4].try_into().unwrap()) != masked_crc(data) {
            return Err(format!("record at {pos}: data CRC mismatch"));
        }
        let (step, v, scalars) = parse_event(data).map_err(|e| format!("record at {pos}: {e}"))?;
        version = version.or(v);
        out.extend(scalars.into_iter().map(|(tag, value)| Scalar { step, tag, value }));
        pos = end + 4;
    }
    Ok((version, out))
}

/// One protobuf field: (field number, wire type, varint value, bytes of the other wire types).
type Field<'a> = (u64, u64, u64, &'a [u8]);

/// A protobuf message's fields.
fn fields(mut b: &[u8]) -> Result<Vec<Field<'_>>, String> {
    fn read_varint(b: &mut &[u8]) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first().ok_or("truncated varint")?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    fn take<'a>(b: &mut &'a [u8], n: usize, field: u64) -> Result<&'a [u8], String> {
        if b.len() < n {
            return Err(format!("field {field}: truncated"));
        }
        let (x, rest) = b.split_at(n);
        *b = rest;
        Ok(x)
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = read_varint(&mut b)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => out.push((field, wire, read_varint(&mut b)?, &[][..])),
            1 => out.push((field, wire, 0, take(&mut b, 8, field)?)),
            2 => {
                let n = read_varint(&mut b)? as usize;
                out.push((field, wire, 0, take(&mut b, n, field)?));
            }
            5 => out.push((field, wire, 0, take(&mut b, 4, field)?)),
            w => return Err(format!("field {field}: wire type {w}")),
        }
    }
    Ok(out)
}

type ParsedEvent = (i64, Option<String>, Vec<(String, f32)>);

fn parse_event(data: &[u8]) -> Result<ParsedEvent, String> {
    let (mut step, mut version, mut scalars) = (0i64, None, Vec::new());
    for (field, wire, v, bytes) in fields(data)? {
        match (field, wire) {
            (2, 0) => step = v as i64,
            (3, 2) => version = Some(String::from_utf8_lossy(bytes).into_owned()),
            (5, 2) => {
                for (f, w, _, value) in fields(bytes)? {
                    if (f, w) != (1, 2) {
                        continue;
                    }
                    let (mut tag, mut x) = (String::new(), None);
                    for (f, w, _, b) in fields(value)? {
                        match (f, w) {
                            (1, 2) => tag = String::from_utf8_lossy(b).into_owned(),
                            (2, 5) => x = Some(f32::from_le_bytes(b.try_into().unwrap())),
                            _ => {}
                        }
                    }
                    if let Some(x) = x {
                        scalars.push((tag, x));
                    }
                }
            }
            _ => {}
        }
    }
    Ok((step, version, scalars))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_trls() {
        assert_eq!(trl_tag("loss").as_deref(), Some("train/loss"));
        assert_eq!(trl_tag("rewards/margins").as_deref(), Some("train/rewards/margins"));
        assert_eq!(trl_tag("eval_rewards/accuracies").as_deref(), Some("eval/rewards/accuracies"));
        assert_eq!(trl_tag("step"), None);
        assert_eq!(ReportTo::parse("jsonl, tensorboard"), Ok(ReportTo { tensorboard: true }));
        assert_eq!(ReportTo::parse("jsonl"), Ok(ReportTo { tensorboard: false }));
        assert!(ReportTo::parse("wandb").unwrap_err().contains("wandb"));
    }

    #[test]
    fn masked_crc_matches_tensorflow() {
        // TensorFlow's crc32c test vector: crc32c("123456789") = 0xe3069283; masked as TFRecord masks it.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8));
    }

    #[test]
    fn written_lines_read_back_and_corruption_is_caught() {
        let dir = std::env::temp_dir().join(format!("dpo-tb-{}", std::process::id()));
        let mut w = EventWriter::create(&dir, trl_tag).unwrap();
        for step in 1..=3u64 {
            let line = serde_json::json!({"step": step, "loss": 0.5 / step as f64, "rewards/margins": step as f64,
                "eval_loss": 0.25, "skipped": true});
            w.metrics_line(&line).unwrap();
        }
        let bytes = std::fs::read(w.path()).unwrap();
        let (version, scalars) = read_scalars(&bytes).unwrap();
        assert_eq!(version.as_deref(), Some("brain.Event:2"));
        assert_eq!(scalars.len(), 9, "booleans are not curves: {scalars:?}");
        let loss: Vec<(i64, f32)> =
            scalars.iter().filter(|s| s.tag == "train/loss").map(|s| (s.step, s.value)).collect();
        assert_eq!(loss, vec![(1, 0.5), (2, 0.25), (3, 0.5 / 3.0)]);
        assert!(scalars.iter().any(|s| s.tag == "eval/loss" && s.step == 2 && s.value == 0.25));
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 6] ^= 1;
        assert!(read_scalars(&bad).unwrap_err().contains("CRC"));
        assert!(read_scalars(&bytes[..n - 3]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
