//! Files to records. A record is one JSON object and where it came from.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::DataError;

#[derive(Clone, Debug)]
pub struct Record {
    /// "line 12" (JSONL) or "element 3" (JSON array): what error messages cite.
    pub location: String,
    pub fields: Map<String, Value>,
}

/// Reads every record of a `.jsonl` (one object per line; blank lines skipped) or `.json` (an array of
/// objects) file. Bytes that are not UTF-8 and lines that are not JSON objects are errors naming the line.
pub fn read_records(path: &Path) -> Result<Vec<Record>, DataError> {
    let p = || path.to_path_buf();
    if path.is_dir() {
        return Err(DataError::IsDirectory { path: p() });
    }
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: p(), source })?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let records = match ext.as_str() {
        "jsonl" | "ndjson" => jsonl(path, &bytes)?,
        "json" => json_array(path, &bytes)?,
        _ => return Err(DataError::UnsupportedFormat { path: p(), ext }),
    };
    if records.is_empty() {
        return Err(DataError::Empty { path: p() });
    }
    Ok(records)
}

fn jsonl(path: &Path, bytes: &[u8]) -> Result<Vec<Record>, DataError> {
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let location = format!("line {}", i + 1);
        let parse_err =
            |message: String| DataError::Parse { path: PathBuf::from(path), location: location.clone(), message };
        let text = std::str::from_utf8(line).map_err(|e| parse_err(format!("not UTF-8 text ({e})")))?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(text).map_err(|e| parse_err(format!("invalid JSON: {e}")))?;
        match value {
            Value::Object(fields) => out.push(Record { location, fields }),
            other => return Err(parse_err(format!("expected a JSON object, found {}", kind(&other)))),
        }
    }
    Ok(out)
}

fn json_array(path: &Path, bytes: &[u8]) -> Result<Vec<Record>, DataError> {
    let err = |location: &str, message: String| DataError::Parse {
        path: PathBuf::from(path),
        location: location.to_string(),
        message,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| err("file", format!("not UTF-8 text ({e})")))?;
    let value: Value = serde_json::from_str(text).map_err(|e| err("file", format!("invalid JSON: {e}")))?;
    let Value::Array(items) = value else {
        return Err(err("file", format!("expected a JSON array of objects, found {}", kind(&value))));
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let location = format!("element {}", i + 1);
            match v {
                Value::Object(fields) => Ok(Record { location, fields }),
                other => Err(err(&location, format!("expected a JSON object, found {}", kind(&other)))),
            }
        })
        .collect()
}

/// "a string", "an array", ...: for messages about wrong types.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
